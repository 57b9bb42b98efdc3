/// mimalloc, not the system allocator: the ingest path allocates per message on several
/// threads, and glibc's arenas cost 15–30 % more CPU there (`benches/d2c_ingest.rs`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    iothubd::cli::main()
}
