#!/usr/bin/env python3
"""iothubd vs Mosquitto on the same workloads, in one run, interleaved (A B A B A B).

Both brokers are driven by `iothubd simulate` with the same flags (the hub in Azure mode over
its plain MQTT port: SAS auth, device topics, PUBACK after fsync, the service side through its
REST API; Mosquitto in --raw mode: the same workload on plain topics, acknowledged from memory).
Printed: the median of the rounds for each side and the ratio hub / Mosquitto (for latencies and
memory, lower is better).

Workloads:
  connect storm N devices offered at COMPARE_CONNECT_RATE connects/s (SAS checked by the hub):
                connects/s from the first CONNECT written to the CONNACK of the last device's
                first connection, and the connect latency p99 (TCP connect -> CONNACK)
  idle memory   broker RSS growth per connected idle device (the first connect storm: a fresh
                process, nothing freed to reuse yet)
  paced D2C     N devices x 1 msg/s, QoS 1, 256 B: ack p50 / p99, steady msg/s
  10x100        10 devices, 100 PUBLISHes in flight each: msg/s
  1000x1        1,000 devices, 1 in flight each: msg/s
  twin storm    N devices, each keeping one twin update in flight: updates/s, round trip p50/p99
  methods       direct-method calls paced at COMPARE_METHOD_RATE/s over the N devices: calls/s,
                round trip p50/p99 as the service sees it
  C2D fan-out   a service keeping 64 C2D sends in flight, round-robin over the N devices:
                deliveries/s as the devices see them, send -> receive p50/p99
  C2D batched   the same with 250 messages per send (the hub's batch send POST
                /messages/deviceBound; Mosquitto: 250 PUBLISHes written together), 2,000 in flight
The twin, method and C2D workloads start once all N devices are connected and subscribed.

What the three service-side counterparts are, and why they are the fair equivalent. The hub does
the service's part in-process and durably: a reported PATCH is written before its 204, a method
call is held by the device's actor and carried to the device, a C2D message is durable in the
device's queue before the REST send gets its 204. A plain broker has no such part, so
`simulate --raw` starts MQTT clients of Mosquitto that play it -- the least any design on a
plain broker needs (one more PUBLISH in and out per operation), with nothing durable:
  twin storm    each device publishes a request to sim/{i}/twin/req/{rid} at QoS 1; a responder
                client subscribed to sim/+/twin/req/# (QoS 1) answers on sim/{i}/twin/res/{rid};
                the round trip is measured at the device, as the hub's $iothub/twin/res/204 is.
  methods       a service client publishes the request to sim/{i}/methods/req/{rid} (QoS 0, as
                the hub's method requests), the device answers on sim/{i}/methods/res/{rid}, the
                service client (subscribed to sim/+/methods/res/#) measures the round trip, as
                the REST caller measures POST /twins/{id}/methods.
  C2D fan-out   the service client publishes QoS 1 to sim/{i}/c2d (devices subscribed at QoS 1,
                PUBACKing as they PUBACK the hub's devicebound messages); its window of 64 is
                released by Mosquitto's PUBACK, as the hub's by the REST send's 204; batched, by
                the 250 PUBACKs of a batch, as the hub's by the batch send's 200.
The hub's service side is HTTPS (one request per operation: TLS, routing, SAS, JSON, a durable
write), Mosquitto's one MQTT connection; that difference is part of what is compared.

Run: cargo build --release --bin iothubd && python3 benches/compare.py
     (COMPARE_DEVICES=10000 COMPARE_SECONDS=20 COMPARE_ROUNDS=3 COMPARE_CONNECT_RATE=10000
     COMPARE_METHOD_RATE=1000; needs `mosquitto` on the PATH)
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BIN = os.environ.get("IOTHUBD_BIN", "target/release/iothubd")
DEVICES = int(os.environ.get("COMPARE_DEVICES", "10000"))
SECONDS = int(os.environ.get("COMPARE_SECONDS", "20"))
ROUNDS = int(os.environ.get("COMPARE_ROUNDS", "3"))
CONNECT_RATE = int(os.environ.get("COMPARE_CONNECT_RATE", "10000"))
METHOD_RATE = int(os.environ.get("COMPARE_METHOD_RATE", "1000"))
# Connecting N devices at 5,000/s before a service workload begins, plus a second of margin.
CONNECTING = DEVICES // 5000 + 1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def start_hub(work, data):
    mqtt = free_port()
    env = dict(os.environ,
               IOTHUBD_LISTEN__ADDRESS="127.0.0.1", IOTHUBD_PORTS__HTTPS="0", IOTHUBD_PORTS__MQTTS="0",
               IOTHUBD_PORTS__METRICS="0", IOTHUBD_PORTS__MQTT_PLAIN=str(mqtt), IOTHUBD_HUB__NAME="bench",
               IOTHUBD_HUB__HOSTNAME="bench.azure-devices.net", RUST_LOG="warn")
    proc = subprocess.Popen([BIN, "serve", "--data-dir", data], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    https = None
    for line in proc.stdout:
        line = line.strip()
        if line.startswith("HTTPS") and "https://" in line:
            https = line.split("https://", 1)[1].split()[0]
            break
    if https is None:
        sys.exit("the hub did not print its HTTPS address")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, ["--plain", "--mqtt", f"127.0.0.1:{mqtt}", "--data-dir", data, "--https", https, "--hub", "bench"]


def start_mosquitto(work):
    port = free_port()
    conf = os.path.join(work, "mosquitto.conf")
    with open(conf, "w") as f:
        # set_tcp_nodelay: without it Nagle's algorithm holds Mosquitto's small writes until the
        # peer ACKs the previous one, and the request/response workloads (methods, twin) would
        # measure TCP's delayed ACK (a 2 ms method round trip instead of 0.1 ms), not the broker.
        f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 0\n"
                "max_queued_messages 100000\npersistence false\nlog_dest none\nset_tcp_nodelay true\n")
    proc = subprocess.Popen(["mosquitto", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, ["--raw", "--mqtt", f"127.0.0.1:{port}"]


def simulate(target, work, args, watch_pid=None):
    """Runs one simulate; returns its report and, with watch_pid, that process' peak RSS (KiB)."""
    report_dir = tempfile.mkdtemp(dir=work)
    cmd = [BIN, "simulate", "--quiet", "--report-dir", report_dir] + target + args
    peak = [0]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib(watch_pid))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True) if watch_pid else None
    if watcher:
        watcher.start()
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done.set()
    if watcher:
        watcher.join()
    if result.returncode != 0:
        sys.exit(f"simulate failed: {' '.join(cmd)}\n{result.stderr[-2000:]}")
    with open(os.path.join(report_dir, "report.json")) as f:
        return json.load(f), peak[0]


def steady(operation):
    """An operation's steady rate; its mean when the window held no whole second of load."""
    return operation["steady_per_s"] or operation["mean_per_s"]


def workloads(skip):
    """(name, [(metric, lower_is_better, extract)], simulate args) for a target."""
    n = str(DEVICES)
    service = ["--devices", n, "--rate", "0", "--duration", f"{SECONDS + CONNECTING}s", "--connect-rate", "5000"]
    return [
        ("connect storm", [("connects/s", False, lambda r, _: r["connect_storm"]["per_s"]),
                           ("connect p99 ms", True, lambda r, _: r["latency"]["connect"]["p99_ms"]),
                           ("idle KiB/device", True, lambda r, m: m)],
         ["--devices", n, "--rate", "0", "--duration", "4s", "--connect-rate", str(CONNECT_RATE),
          "--subscribe", "none"] + skip),
        ("paced D2C", [("msg/s", False, lambda r, _: r["throughput"]["steady_per_s"]),
                       ("ack p50 ms", True, lambda r, _: r["latency"]["ack"]["p50_ms"]),
                       ("ack p99 ms", True, lambda r, _: r["latency"]["ack"]["p99_ms"])],
         ["--devices", n, "--rate", "1", "--duration", f"{SECONDS}s", "--connect-rate", "5000",
          "--subscribe", "none"] + skip),
        ("10x100", [("msg/s", False, lambda r, _: r["throughput"]["mean_per_s"])],
         ["--devices", "10", "--in-flight", "100", "--duration", "10s", "--subscribe", "none"] + skip),
        ("1000x1", [("msg/s", False, lambda r, _: r["throughput"]["mean_per_s"])],
         ["--devices", "1000", "--in-flight", "1", "--duration", "10s", "--connect-rate", "5000",
          "--subscribe", "none"] + skip),
        ("twin storm", [("updates/s", False, lambda r, _: steady(r["operations"]["twin"])),
                        ("twin p50 ms", True, lambda r, _: r["latency"]["twin"]["p50_ms"]),
                        ("twin p99 ms", True, lambda r, _: r["latency"]["twin"]["p99_ms"])],
         service + ["--twin-in-flight", "1", "--subscribe", "none"] + skip),
        ("methods", [("calls/s", False, lambda r, _: steady(r["operations"]["methods"])),
                     ("call p50 ms", True, lambda r, _: r["latency"]["method"]["p50_ms"]),
                     ("call p99 ms", True, lambda r, _: r["latency"]["method"]["p99_ms"])],
         service + ["--method-rate", str(METHOD_RATE), "--subscribe", "methods"] + skip),
        ("C2D fan-out", [("deliveries/s", False, lambda r, _: steady(r["operations"]["c2d"])),
                         ("c2d p50 ms", True, lambda r, _: r["latency"]["c2d"]["p50_ms"]),
                         ("c2d p99 ms", True, lambda r, _: r["latency"]["c2d"]["p99_ms"])],
         service + ["--c2d-in-flight", "64", "--subscribe", "c2d"] + skip),
        ("C2D batched", [("deliveries/s", False, lambda r, _: steady(r["operations"]["c2d"])),
                         ("c2d p50 ms", True, lambda r, _: r["latency"]["c2d"]["p50_ms"]),
                         ("c2d p99 ms", True, lambda r, _: r["latency"]["c2d"]["p99_ms"])],
         service + ["--c2d-in-flight", "2000", "--c2d-batch", "250", "--subscribe", "c2d"] + skip),
    ]


def main():
    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, "hub")
        hub, hub_target = start_hub(work, data)
        # Provision the hub's devices once (bulk import; later runs skip it), then restart the
        # hub so the first connect storm meets a fresh process, as Mosquitto's does.
        simulate(hub_target, work, ["--devices", str(DEVICES), "--rate", "0", "--duration", "1s",
                                    "--connect-rate", "5000", "--subscribe", "none"])
        hub.kill()
        hub.wait()
        hub, hub_target = start_hub(work, data)
        mosq, mosq_target = start_mosquitto(work)
        try:
            print(f"iothubd vs Mosquitto: {DEVICES} devices, {SECONDS} s windows, {ROUNDS} interleaved rounds")
            print(f"{'workload':<15} {'metric':<16} {'iothubd':>12} {'mosquitto':>12} {'ratio':>8}")
            for (name, metrics, args), (_, _, raw_args) in zip(workloads(["--skip-provision"]), workloads([])):
                results = {"hub": [], "mosq": []}
                for _ in range(ROUNDS):
                    for side, target, proc, a in (("hub", hub_target, hub, args), ("mosq", mosq_target, mosq, raw_args)):
                        before = rss_kib(proc.pid)
                        report, peak = simulate(target, work, a, watch_pid=proc.pid)
                        per_device = max(peak - before, 0) / DEVICES
                        results[side].append((report, per_device))
                        time.sleep(1)
                for metric, _lower, extract in metrics:
                    # Memory from the first round only: later rounds reuse what earlier ones freed.
                    pick = (lambda v: v[0]) if metric.startswith("idle") else statistics.median
                    h = pick([extract(r, m) for r, m in results["hub"]])
                    q = pick([extract(r, m) for r, m in results["mosq"]])
                    ratio = h / q if q else float("nan")
                    print(f"{name:<15} {metric:<16} {h:>12.2f} {q:>12.2f} {ratio:>8.2f}")
        finally:
            for p in (hub, mosq):
                p.kill()
                p.wait()


if __name__ == "__main__":
    main()
