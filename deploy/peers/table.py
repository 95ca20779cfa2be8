#!/usr/bin/env python3
"""The one table of make bench-peers: reads the RESULT lines of a run, prints Markdown.

Usage: table.py RESULTS_FILE [HEADER_LINE]
Ratios are Gangway / peer: above 1 is better for rates, below 1 is better for times, p99 and CPU.
"""
import sys


def parse(path):
    rows = []
    for line in open(path):
        if not line.startswith("RESULT "):
            continue
        parts = line.split()
        kv = dict(p.split("=", 1) for p in parts[3:] if "=" in p)
        rows.append((parts[1], parts[2], kv))
    return rows


def find(rows, kind, system, **match):
    for k, s, kv in rows:
        if k == kind and s == system and all(kv.get(a) == str(b) for a, b in match.items()):
            return kv
    return None


def median(found):
    """The row of median throughput among a write's rounds (the lower middle of an even count),
    with the rounds' range beside it; None when there is none."""
    if not found:
        return None
    ranked = sorted(found, key=lambda kv: float(kv["tput"]))
    row = dict(ranked[(len(ranked) - 1) // 2])
    row["rounds"] = [kv["tput"] for kv in found]
    return row


def f(x, digits=0):
    return f"{float(x):,.{digits}f}"


def ratio(a, b):
    try:
        return f"{float(a) / float(b):.2f}x"
    except (TypeError, ValueError, ZeroDivisionError):
        return "-"


def recorded(r):
    """Whether a jobs row carries the span its system recorded (submission accepted -> last end,
    from the replicas' leader-stamped times or slurmctld's log; runs before it do not)."""
    return r.get("recorded_ms", "?").isdigit()


def main():
    rows = parse(sys.argv[1])
    out = []
    if len(sys.argv) > 2:
        out.append(sys.argv[2])
        out.append("")
    out.append("| workload | Gangway | peer | Gangway / peer |")
    out.append("|---|---|---|---|")
    clients = []
    for k, s, kv in rows:
        if k == "write" and kv["clients"] not in clients:
            clients.append(kv["clients"])
    def rounds(r):
        runs = r.get("rounds", [])
        if len(runs) < 2:
            return ""
        return f"; median of {len(runs)} rounds: {', '.join(f(t) for t in runs)}/s"
    cell = lambda r: (f"{f(r['tput'])}/s, p99 {f(r['p99_ms'], 1)} ms" + (f" ({r['errors']} errors)" if r["errors"] != "0" else "") + rounds(r)) if r else "skipped"
    # Each write is run in one or more rounds (PEERS_WRITE_ROUNDS, the two systems in turn); a row
    # is the round of median throughput.
    def write(system, c, stream=True):
        # Gangway's production way is the default stream (runs from before the field had no
        # other); stream=False: its A/B runs one AppendEntries call at a time. etcd has one way.
        way = lambda kv: system != "gangway" or kv.get("replication", "stream").startswith("stream") == stream
        return median([kv for k, s, kv in rows if k == "write" and s == system and kv["clients"] == c and way(kv)])
    gangway_write = lambda c: write("gangway", c)

    for c in clients:
        g, e = gangway_write(c), write("etcd", c)
        rat = f"{ratio(g['tput'], e['tput'])} throughput, {ratio(g['p99_ms'], e['p99_ms'])} p99" if g and e else "-"
        out.append(f"| 256-byte replicated writes, {c} client{'s' if c != '1' else ''} (vs etcd) | {cell(g)} | {cell(e)} | {rat} |")
    # CPU per write (a run from before the fields has none): the members' own, which is what the
    # two systems differ in, and the load generator's beside it, which both pay on the same cores.
    cpu = lambda r: f"{f(r['cpu_us'])} us (load generator {f(r['gen_cpu_us'])} us)"
    for c in clients:
        g, e = gangway_write(c), write("etcd", c)
        if g and e and "cpu_us" in g and "cpu_us" in e:
            out.append(f"| CPU per write of the three members, {c} client{'s' if c != '1' else ''} (vs etcd) | {cpu(g)} | {cpu(e)} | {ratio(g['cpu_us'], e['cpu_us'])} CPU |")
    for c in clients:
        g, s = gangway_write(c), write("gangway", c, False)
        if g and s:
            rat = f"{ratio(g['tput'], s['tput'])} throughput, {ratio(g['p99_ms'], s['p99_ms'])} p99"
            out.append(f"| same, {c} client{'s' if c != '1' else ''}: replication on one stream per follower vs one AppendEntries call at a time (Gangway vs Gangway) | {cell(g)} | {cell(s)} | {rat} |")
    e = find(rows, "failover", "etcd")
    for detect, how in (("on", "production defaults"), ("off", "leader-loss detection off")):
        g = find(rows, "failover", "gangway", detect=detect)
        if detect == "on" and g is None:
            g = find(rows, "failover", "gangway")  # a run from before the detect field
        if not (g or (e and detect == "on")):
            continue
        cell = lambda r: (f"p50 {f(r['p50_ms'])} ms, p99 {f(r['p99_ms'])} ms ({r['kills']} kills; election timeout "
                          f"{r['timeout_ms']} ms: campaigns {r['campaign_ms']} ms after the last heartbeat"
                          + ("; detection on: at once when the leader's port refuses)" if r.get("detect") == "on" else ")")) if r else "skipped"
        rat = f"{ratio(g['p50_ms'], e['p50_ms'])} p50, {ratio(g['p99_ms'], e['p99_ms'])} p99" if g and e else "-"
        out.append(f"| leader kill -9 -> next accepted write, {how} (vs etcd) | {cell(g)} | {cell(e)} | {rat} |")

    def gw(kind, **m):
        return find(rows, kind, "gangway-tls", **m), find(rows, kind, "gangway-insecure", **m)

    for label, what in (("trivial", "trivial 1-GPU jobs, first submit -> last finished"),
                        ("array", "trivial 1-GPU jobs as one job array, first submit -> last finished"),
                        ("gang", "gangs of 2 x 8 GPUs, first submit -> last finished")):
        (gt, gi), s = gw("jobs", label=label), find(rows, "jobs", "slurm", label=label)
        if not (gt or gi or s):
            continue
        n = (gt or gi or s)["n"]

        def cell(r):
            if not r:
                return "skipped"
            bad = "" if r["completed"] == r["n"] else f", {r['completed']}/{r['n']} succeeded"
            rec = f"; {f(int(r['recorded_ms']) / 1000, 2)} s as recorded" if recorded(r) else ""
            return f"{f(int(r['total_ms']) / 1000, 1)} s (submitting {f(int(r['submit_ms']) / 1000, 1)} s{rec}{bad})"
        g = gt or gi
        gcell = cell(gt) + (f"; TLS off {cell(gi)}" if gt and gi else "") if gt else cell(gi)
        rat = ratio(g["total_ms"], s["total_ms"]) + " time" if g and s else "-"
        if g and s and recorded(g) and recorded(s):
            rat += f" ({ratio(g['recorded_ms'], s['recorded_ms'])} as recorded)"
        out.append(f"| {n} {what} (vs Slurm, 8 slurmd) | {gcell} | {cell(s)} | {rat} |")
    for p in ("1", "8"):
        (gt, gi), s = gw("submit", submitters=p), find(rows, "submit", "slurm", submitters=p)
        if not (gt or gi or s):
            continue
        cell = lambda r: f"{f(r['rate'])} jobs/s ({r['n']} in {f(int(r['ms']) / 1000, 1)} s)" if r else "skipped"
        g = gt or gi
        gcell = cell(gt) + (f"; TLS off {cell(gi)}" if gt and gi else "") if gt else cell(gi)
        rat = ratio(g["rate"], s["rate"]) + " rate" if g and s else "-"
        out.append(f"| submit rate, {p} submitter{'s' if p != '1' else ''}, CLI per job (vs sbatch) | {gcell} | {cell(s)} | {rat} |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
