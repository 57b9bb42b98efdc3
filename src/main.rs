fn main() -> std::process::ExitCode {
    iothubd::cli::main()
}
