//! What the operating system allows a run: open files (one socket per device), local ports
//! (one per connection and local address), and the process' memory as the report shows it.
//!
//! A run checks its open-file limit before it starts (raising the soft limit to the hard one
//! first) and, when the devices do not fit, says how many processes with `--shard i/N` the run
//! needs instead of failing half-way with `EMFILE`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, bail};

/// File descriptors a run needs besides the devices' sockets: stdio, the runtime's epoll and
/// wake-up descriptors, the HTTPS client used to provision, the report files.
pub const FD_MARGIN: u64 = 64;
/// Ephemeral ports kept in reserve on each local address (other programs, TIME_WAIT).
const PORT_MARGIN: u32 = 1000;

/// Raises the soft open-file limit to the hard limit; returns the limit now in force.
pub fn raise_open_file_limit() -> anyhow::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX).context("cannot read or raise the open-file limit (RLIMIT_NOFILE)")
}

/// Checks that `devices` sockets fit under `limit`; if not, says how to split the run.
pub fn check_fits(devices_in_process: u32, devices_total: u32, limit: u64) -> anyhow::Result<()> {
    let need = u64::from(devices_in_process) + FD_MARGIN;
    if need <= limit {
        return Ok(());
    }
    let per_process = limit.saturating_sub(FD_MARGIN).max(1);
    let processes = u64::from(devices_total).div_ceil(per_process);
    bail!(
        "{devices_in_process} devices need {need} open files but this process may open {limit} (ulimit -n; \
         the hard limit is the most it can raise itself to). This run needs {processes} processes of at most \
         {per_process} devices each; run each with --shard i/{processes} for i = 1..{processes} (or raise the \
         hard limit: ulimit -Hn, /etc/security/limits.conf, systemd LimitNOFILE)"
    )
}

/// Connections one local address can hold to one broker: the ephemeral port range, less a margin.
pub fn ports_per_address() -> u32 {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut bounds = range.split_whitespace().filter_map(|v| v.parse::<u32>().ok());
    match (bounds.next(), bounds.next()) {
        (Some(low), Some(high)) if high > low => (high - low + 1).saturating_sub(PORT_MARGIN).max(1),
        // Linux's default range, 32768-60999.
        _ => 28232 - PORT_MARGIN,
    }
}

/// The local addresses to connect from when none were given: none (the kernel picks) while
/// one address' ports suffice; for more devices against a loopback IPv4 target, 127.0.0.1,
/// 127.0.0.2, … — every 127.x address is local on Linux, each with its own ports.
pub fn auto_source_addrs(target: SocketAddr, devices: u32) -> anyhow::Result<Vec<IpAddr>> {
    let per_address = ports_per_address();
    if devices <= per_address {
        return Ok(Vec::new());
    }
    let needed = devices.div_ceil(per_address);
    if !target.ip().is_loopback() || !target.is_ipv4() {
        bail!(
            "{devices} connections to {target} need {needed} local addresses ({per_address} ephemeral ports each); \
             give them with --source-addrs a,b,c or a range first-last"
        );
    }
    Ok((1..=needed).map(|i| IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 0)) + i))).collect())
}

/// `127.0.0.1-127.0.0.8` (an IPv4 range, both ends included) or `a,b,c`.
pub fn parse_source_addrs(text: &str) -> anyhow::Result<Vec<IpAddr>> {
    let text = text.trim();
    if let Some((first, last)) = text.split_once('-') {
        let first: Ipv4Addr =
            first.trim().parse().with_context(|| format!("--source-addrs: '{first}' is not an IPv4 address"))?;
        let last: Ipv4Addr =
            last.trim().parse().with_context(|| format!("--source-addrs: '{last}' is not an IPv4 address"))?;
        let (a, b) = (u32::from(first), u32::from(last));
        if b < a || b - a >= 65_536 {
            bail!("--source-addrs: {first}-{last} is not a range of at most 65536 addresses");
        }
        return Ok((a..=b).map(|ip| IpAddr::V4(Ipv4Addr::from(ip))).collect());
    }
    let addrs = text
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| a.parse::<IpAddr>().with_context(|| format!("--source-addrs: '{a}' is not an IP address")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if addrs.is_empty() {
        bail!("--source-addrs is empty");
    }
    Ok(addrs)
}

/// Resident memory of this process in KiB (`VmRSS` of /proc/self/status); 0 where unknown.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_address_ranges_and_lists() {
        let range = parse_source_addrs("127.0.0.1-127.0.0.3").expect("range");
        assert_eq!(range.iter().map(ToString::to_string).collect::<Vec<_>>(), ["127.0.0.1", "127.0.0.2", "127.0.0.3"]);
        assert_eq!(parse_source_addrs("10.0.0.1, ::1").map(|a| a.len()).ok(), Some(2));
        assert!(parse_source_addrs("127.0.0.3-127.0.0.1").is_err());
        assert!(parse_source_addrs("nope").is_err());
    }

    #[test]
    fn too_many_devices_for_the_limit_names_the_shards() {
        assert!(check_fits(1000, 1000, 20_000).is_ok());
        let err = check_fits(50_000, 50_000, 20_000).expect_err("does not fit").to_string();
        assert!(err.contains("needs 3 processes of at most 19936 devices each"), "{err}");
        assert!(err.contains("--shard i/3"), "{err}");
    }

    #[test]
    fn loopback_targets_get_more_local_addresses_when_ports_run_out() {
        let target: SocketAddr = "127.0.0.1:1883".parse().expect("addr");
        assert!(auto_source_addrs(target, 100).expect("fits").is_empty());
        let many = auto_source_addrs(target, ports_per_address() * 2 + 1).expect("loopback");
        assert_eq!(many.len(), 3);
        assert_eq!(many[0].to_string(), "127.0.0.1");
        let remote: SocketAddr = "192.0.2.1:1883".parse().expect("addr");
        assert!(auto_source_addrs(remote, ports_per_address() * 2).is_err());
    }
}
