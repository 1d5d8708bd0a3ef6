"""The results as markdown: one summary table (the README's), then each figure in detail."""

from __future__ import annotations

from typing import Any

from .common import kb, ms, secs, verdict
from .concurrency import figures


def _pct(x: float) -> str:
    return f"{x:+.0%}" if abs(x) < 10 else f"{x:+.1f}x"


def summary(r: dict[str, Any]) -> list[str]:
    rows = [
        "| figure | flux-mcp | baseline, same run | flux vs baseline | goal | |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    if c := r.get("cold_start"):
        rows.append(
            f"| cold start: spawn to first `tools/list` (stdio, median of {c['rounds']}) | {secs(c['flux_p50'])} "
            f"| floor (bare `mcp` server): {secs(c['floor_p50'])} | {c['ratio_p50']:.2f}x (best runs: "
            f"{c['ratio_min']:.2f}x) | <= 1.10x | {verdict(c['met'])} |"
        )
    if o := r.get("overhead"):
        for op, label in (
            ("check", "`check_prediction`, finished job"),
            ("generate", "`generate_image`, zero-latency fake"),
        ):
            for transport, short in (("stdio", "stdio"), ("streamable-http", "HTTP")):
                s = o[transport]
                x = s[op]
                if op == "generate" and "floor_p50" in x:
                    floor = f"1 raw generation request + `ping`: {ms(x['floor_p50'])} / {ms(x['floor_p95'])}"
                    extra = (f" (vs 1 raw status request + `ping`, {ms(s['floor_p50'])}: "
                             f"{x['minus_floor1_p50'] * 1000:+.1f} ms)")
                else:
                    floor = f"1 raw status request + `ping`: {ms(s['floor_p50'])} / {ms(s['floor_p95'])}"
                    extra = ""
                rows.append(
                    f"| call overhead: {label}, {short}, p50 / p95 | {ms(x['p50'])} / {ms(x['p95'])} "
                    f"| {floor} | {x['minus_floor_p50'] * 1000:+.1f} ms{extra} | <= +2 ms | {verdict(x['met'])} |"
                )
    if c := r.get("completion"):
        first = [row for row in c["rows"] if row["phase"] == "warmup"]
        if first:
            flux = ", ".join(f"{row['variant']} {row['length_s']:g} s: {row['flux']['requests_mean']:.1f} "
                             f"({row['baseline']['requests_mean']:.1f})" for row in first)
            rows.append(
                "| completion detection: first jobs of a documented model, status requests per job "
                f"(fixed 2 s polling) | {flux} | fixed 2 s polling, the same jobs | | requests <= baseline "
                f"| {verdict(all(row['requests_met'] for row in first))} |"
            )
        for row in c["rows"]:
            if row["phase"] != "measured" or row["variant"] != "exact":
                continue
            f, b = row["flux"], row["baseline"]
            rows.append(
                f"| completion detection: {row['length_s']:g} s jobs, p50 delay (status requests per job) "
                f"| {secs(f['delay_p50'])} ({f['requests_mean']:.1f}) "
                f"| fixed 2 s polling: {secs(b['delay_p50'])} ({b['requests_mean']:.1f}) "
                f"| {f['delay_p50'] / b['delay_p50']:.2f}x delay, {f['requests_mean'] / b['requests_mean']:.2f}x "
                f"requests | <= {secs(row['goal_delay_s'])}, requests <= baseline | {verdict(row['met'])} |"
            )
    if c := r.get("concurrency"):
        fl = c["floor"]
        for x, how in ((c, "default (held submits)"), (c.get("polled"), "sync mode off (polled)")):
            if not x:
                continue
            rows.append(
                f"| concurrency: {c['calls']} simultaneous `generate_image`, {c['job_s']:g} s jobs, one HTTP "
                f"server, {how} | {secs(x['wall_s'])} wall, {x['errors']} errors, peak RSS "
                f"{x['rss_peak_kb'] / 1024:.0f} MB, {x['server_cpu_per_call_ms']:.1f} ms server CPU per call "
                f"| one job: {secs(c['job_s'])}; one call alone: {secs(x['single_p50'])}; floor ({c['calls']} "
                f"sleeping calls, bare `mcp` server): {secs(fl['wall_s'])}, {fl['server_cpu_per_call_ms']:.1f} ms "
                f"CPU per call | {x['ratio_to_job']:.2f}x the job ({x['ratio_to_floor']:.2f}x the floor) "
                f"| <= 1.25x the job, 0 errors | {verdict(x['met'])} |"
            )
    if h := r.get("health"):
        us = 1e6
        rows.append(
            f"| `provider: \"auto\"` health from the journal ({h['rows']:,} attempt rows in a day, {h['recent']} "
            f"in the last 10 min): planning a call, p50 / p95 | {h['cached']['p50'] * us:.0f} / "
            f"{h['cached']['p95'] * us:.0f} µs (cache expired: {h['uncached']['p50'] * us:.0f} µs; the query: "
            f"{h['query']['p50'] * us:.0f} µs) | the same plan with no health to read: {h['baseline']['p50'] * us:.0f} µs "
            f"| {h['cached_minus_baseline_p50'] * us:+.0f} µs ({h['uncached_minus_baseline_p50'] * us:+.0f} µs "
            f"uncached) | <= +{h['goal_us']:g} µs | {verdict(h['met'])} |"
        )
    if (m := r.get("memory")) and "variants" in m:
        for v in m["variants"].values():
            rise = (v["peak_kb"] - v["idle_kb"]) / 1024
            one = (v["single_peak_kb"] - v["idle_kb"]) / 1024
            rows.append(
                f"| memory: {m['jobs']} simultaneous `generate_image`, each answered a {m['side']}² photo-like PNG "
                f"({kb(v['image_bytes'] or 0)}; the largest size documented), {v['label']}, peak RSS "
                f"| {v['peak_kb'] / 1024:.0f} MB (+{rise:.0f} MB), {v['errors']} errors "
                f"| idle, same server: {v['idle_kb'] / 1024:.0f} MB; one such job alone: "
                f"{v['single_peak_kb'] / 1024:.0f} MB (+{one:.0f} MB) | {v['rise_ratio']:.2f}x one job's rise "
                f"| reported (issue 13) | |"
            )
    if p := r.get("preview"):
        for row in p["rows"]:
            rows.append(
                f"| preview: {row['side']}² {row['format'].upper()} ({kb(row['source_bytes'])}) "
                f"| {ms(row['preview_p50_s'])}, {kb(row['preview_bytes'])} ({row['preview_dims'][0]}); "
                f"result {kb(row['result_bytes'])} | one decode + one JPEG encode: {ms(row['baseline_p50_s'])} "
                f"| {row['ratio']:.2f}x | reported; under the budget | {verdict(row['under_budget'])} |"
            )
    if x := r.get("context"):
        flux, atlas = x["flux"], x["atlascloud"]
        ft = flux["tools_list"]
        if "tools_list" in atlas:
            at = atlas["tools_list"]
            other = f"atlascloud-mcp {atlas.get('version')}: {kb(at['bytes'])} (~{at['tokens_est']} tokens, {at['tools']} tools)"
            ratio = f"{x['tools_list_ratio']:.2f}x"
        else:
            other, ratio = f"atlascloud-mcp: {atlas.get('skipped')}", "n/a"
        bound = ft.get("bound")
        rows.append(
            f"| context cost: `tools/list` | {kb(ft['bytes'])} (~{ft['tokens_est']} tokens, {ft['tools']} tools) "
            f"| {other} | {ratio} | " + (f"at most {bound:,} bytes | {verdict(ft['within_bound'])} |"
                                          if bound else "reported | |")
        )
        if res := flux.get("result"):
            rows.append(
                f"| context cost: finished result (text; `structuredContent`) | {res['text_bytes']} B "
                f"(~{res['text_tokens_est']} tokens); {res['structured_bytes']} B (~{res['structured_tokens_est']} "
                f"tokens) | atlascloud-mcp: not measured (API base URL hard-coded) | n/a | reported | |"
            )
    return rows


def _jobs(n: int | None) -> str:
    return "never" if n is None else str(n)


def details(r: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if c := r.get("completion"):
        out += [
            "",
            "### Completion detection, every run",
            "",
            (
                f"Baseline: {c['baseline']}. Delay: the answer reaching the client minus the job's completion at the "
                f"fake. Goal: {c['goal']}. `jitter` jobs last D x U(0.9, 1.1); the goal is judged on `exact`. "
                "`first jobs` are the warm-up, with no history for the model: polled by its documented typical "
                "duration (the bench documents each model as taking its nominal length), judged on status "
                "requests only. Exact 20 s and 60 s jobs end on a "
                "multiple of the baseline's 2 s period, so there its delay is only a round trip: a coincidence real "
                "jobs do not have (the `jitter` rows show its usual ~1 s)."
            ),
            "",
            (
                "| jobs | phase | n | flux p50 / p95 delay | flux requests mean (max) | 2 s polling p50 / p95 delay "
                "| 2 s polling requests mean | delay goal | met |"
            ),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in c["rows"]:
            f, b = row["flux"], row["baseline"]
            phase = "measured" if row["phase"] == "measured" else "first jobs"
            met = verdict(row["met"]) if row["phase"] == "measured" else f"requests: {verdict(row['requests_met'])}"
            out.append(
                f"| {row['variant']} {row['length_s']:g} s | {phase} | {f['n']} | {secs(f['delay_p50'])} / "
                f"{secs(f['delay_p95'])} | {f['requests_mean']:.2f} ({f['requests_max']}) | {secs(b['delay_p50'])} / "
                f"{secs(b['delay_p95'])} | {b['requests_mean']:.2f} | {secs(row['goal_delay_s'])} | {met} |"
            )
    if lr := r.get("long_run"):
        out += [
            "",
            f"### Completion detection, long run (simulated: {lr['jobs']} jobs in a row, last {lr['tail']})",
            "",
            (
                "The real `Pacer` and `PollSchedule` on a simulated clock, the journal's rule (median of the last 20 "
                "learned durations, learned only from jobs that measured theirs) and the runner's (a duration is the "
                f"moment the check that found the job done was sent, {lr['late_s'] * 1000:g} ms after its moment; "
                f"{lr['rtt_s'] * 1000:g} ms round trip). `jitter`: lengths D x U(0.9, 1.1); `exact`: D each time. "
                "`before`: the schedule before probing was paced (every learned job looks early, every job teaches). "
                "`previous`: first learned check at 1.03 x expected + 50 ms: its estimate grows without bound."
            ),
            "",
            (
                "| jobs | flux-mcp p50 delay (requests) | estimate / true | before p50 delay (requests) | "
                "estimate / true | previous p50 delay (requests) | estimate / true | fixed 2 s p50 delay (requests) |"
            ),
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in lr["rows"]:
            for variant in ("exact", "jitter"):
                c = row[variant]
                cells = " | ".join(f"{secs(c[n]['delay_p50'])} ({c[n]['requests_mean']:.2f}) | "
                                   f"{c[n]['estimate_ratio']:.2f}" for n in ("flux-mcp", "before", "previous"))
                out.append(f"| {variant} {row['length_s']:g} s | {cells} | {secs(c['fixed']['delay_p50'])} "
                           f"({c['fixed']['requests_mean']:.1f}) |")
        out += [
            "",
            (
                f"Jobs that get faster or slower: {lr['steady_before']} jobs of D, then {lr['step_after']} of D x f. "
                f"Jobs until the estimate is within {lr['followed']:.0%} of the new length for 10 jobs in a row "
                "(never: not within the run), and the 50 jobs after the change: mean requests and p50 delay."
            ),
            "",
            "| jobs | change | flux-mcp: jobs to follow | requests, delay | before: jobs to follow | requests, delay |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for row in lr["rows"]:
            for change, step in row["steps"].items():
                f, bf = step["flux-mcp"], step["before"]
                out.append(
                    f"| {row['length_s']:g} s | {change} | {_jobs(f['jobs_to_follow'])} | {f['requests_mean']:.2f}, "
                    f"{secs(f['delay_p50'])} | {_jobs(bf['jobs_to_follow'])} | {bf['requests_mean']:.2f}, "
                    f"{secs(bf['delay_p50'])} |"
                )
    if o := r.get("overhead"):
        out += [
            "",
            "### Call overhead, components (p50)",
            "",
            (
                "| transport | raw status request | raw generation request (sync mode, image inline) | "
                "raw polled generation (submit + status + download) | `ping` round trip | "
                "`check_prediction` | `generate_image` | errors |"
            ),
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for transport in ("stdio", "streamable-http"):
            s = o[transport]
            out.append(
                f"| {transport} | {ms(s['raw1_p50'])} | {ms(s.get('rawgen_p50', float('nan')))} | "
                f"{ms(s['raw3_p50'])} | {ms(s['ping_p50'])} | "
                f"{ms(s['check']['p50'])} | {ms(s['generate']['p50'])} | {s['errors']} |"
            )
    if p := r.get("preview"):
        out += [
            "",
            "### Preview",
            "",
            (
                "| image | source | preview | preview bytes (base64) | whole result | budget | make preview | "
                "baseline | `generate_image` end to end |"
            ),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in p["rows"]:
            out.append(
                f"| {row['side']}² {row['format']} | {kb(row['source_bytes'])} | {row['preview_dims'][0]} | "
                f"{kb(row['preview_bytes'])} ({kb(row['preview_b64_bytes'])}) | {kb(row['result_bytes'])} | "
                f"{kb(row['budget_bytes'])} preview, {kb(p['result_limit'])} result | {ms(row['preview_p50_s'])} | "
                f"{ms(row['baseline_p50_s'])} | {ms(row['end_to_end_p50_s'])} |"
            )
    if c := r.get("concurrency"):
        out += [
            "",
            "### Concurrency",
            "",
            f"{c['calls']} sessions (one connection each) opened first, then released at once; 64x64 results.",
        ]
        for x, how in ((c, "Default (held submits)"), (c.get("polled"), "Sync mode off (polled)")):
            if x:
                out += [
                    "",
                    f"{how}: per-call p50 {secs(x['call_p50'])}, slowest {secs(x['call_max'])}. Server CPU during "
                    f"the burst: {x['server_cpu_s']:.2f} s ({x['server_cpu_per_call_ms']:.1f} ms a call; the floor: "
                    f"{c['floor']['server_cpu_per_call_ms']:.1f} ms). Server RSS: {x['rss_idle_kb'] / 1024:.0f} MB "
                    f"idle with the sessions open, {x['rss_peak_kb'] / 1024:.0f} MB peak (floor: "
                    f"{c['floor']['rss_peak_kb'] / 1024:.0f} MB).",
                ]
    if (m := r.get("memory")) and "variants" in m:
        out += [
            "",
            "### Memory",
            "",
            (
                f"Measured by `python -m bench.memory` ({m.get('measured', 'date unknown')}). Each job asks for "
                f"{m['asked']}x{m['asked']} (Atlas Cloud's largest; the bench fake is Atlas's) and is answered a "
                f"{m['side']}x{m['side']} image, the largest any provider documents for an exact-size model. RSS "
                "of the server process from /proc: idle after one small call, then the high-water mark (reset "
                f"before each burst) of one job alone and of {m['jobs']} at once, {m['rounds']} bursts (the "
                "largest shown)."
            ),
            "",
            "| variant | idle | one job, peak | 4 jobs, peak (each burst) | after the bursts | errors |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for v in m["variants"].values():
            bursts = ", ".join(f"{x / 1024:.0f}" for x in v["peaks_kb"])
            out.append(
                f"| {v['label']} | {v['idle_kb'] / 1024:.0f} MB | {v['single_peak_kb'] / 1024:.0f} MB | {bursts} MB "
                f"| {v['after_kb'] / 1024:.0f} MB | {v['errors']} |"
            )
    if x := r.get("context"):
        out += ["", "### Context cost", "", f"Tokens estimated at {x['token_estimate']}."]
        if res := x["flux"].get("result"):
            out += ["", "A typical finished result's text:", "", "```", res["text"], "```"]
    return out


SAME = 1.05
"""Against another revision, a figure within this factor of it counts as the same: these figures move by
about that much between two runs of one revision on this machine."""


def against(r: dict[str, Any]) -> list[str]:
    """Each figure `--before` measured on both revisions, as the ratio to its own baseline (measured with
    it), this revision's against the other's."""
    b = r.get("before")
    if not b:
        return []
    rows: list[tuple[str, float, float, float | None]] = []
    """(figure, this revision's, the other's, and where the run has it the control: this revision again / this)"""
    if (now := r.get("cold_start")) and (old := now.get("before")):
        rows.append(("cold start, p50 / floor's (same rotation)", now["ratio_p50"], old["ratio_p50"], None))
        rows.append(("cold start CPU, p50 / floor's", now["cpu_ratio_p50"], old["cpu_ratio_p50"], None))
    if now := r.get("overhead"):
        for transport in ("stdio", "streamable-http"):
            n = now.get(transport) or {}
            if o := n.get("before"):
                again = n.get("again")  # runs before the control was added have none
                for op, floor, label in (("generate", "floorgen_p50", "generate_image"),
                                         ("check", "floor_p50", "check_prediction")):
                    rows.append((f"`{label}` p50 / raw requests' ({transport}, same rounds)",
                                 n[op]["p50"] / n[floor], o[op]["p50"] / n[floor],
                                 again[op]["p50"] / n[op]["p50"] if again else None))
    if (now := r.get("concurrency")) and (old := b.get("concurrency")):
        paired = "paired" in now and "paired" in old
        n, o = (now["paired"], old["paired"]) if paired else (figures(now), figures(old))  # older runs: one each
        turns = f" (median of {n['turns']} turns each)" if paired else ""
        rows.append((f"concurrency (held submits), wall / job{turns}", n["ratio_to_job"], o["ratio_to_job"], None))
        rows.append((f"concurrency (polled), wall / job{turns}", n["polled_ratio_to_job"], o["polled_ratio_to_job"],
                     None))
        rows.append((f"concurrency (held), server CPU per call / floor's{turns}", n["cpu_to_floor"],
                     o["cpu_to_floor"], None))
    if (now := r.get("preview")) and (old := b.get("preview")):
        for n, o in zip(now["rows"], old.get("rows", [])):
            rows.append((f"preview {n['side']}² {n['format']}, time / one decode + encode (median of "
                         f"{old.get('turns', 1)} turns each)", n.get("paired_ratio", n["ratio"]), o["ratio"], None))
    out = [
        "",
        f"### Against {b['rev']}, same run",
        "",
        f"`{b['rev']}`'s package (`--before`) measured in the same rounds (cold start, call overhead) or in "
        f"turns, this revision's and the other's in alternation (concurrency, previews), "
        f"each as the ratio to the baseline measured with it; lower "
        f"is better. Within {SAME:g}x counts as the same. The control, where there is one: a second server of this "
        f"revision in the same rounds, its p50 over this one's — how far two runs of the same code drift apart "
        f"here and now.",
        "",
        f"| figure | this revision | {b['rev']} | this / {b['rev']} | | control: this again / this |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, n, o, control in rows:
        ratio = n / o if o else float("nan")
        out.append(f"| {label} | {n:.2f} | {o:.2f} | {ratio:.2f} | {'not worse' if ratio <= SAME else '**worse**'} "
                   f"| {'' if control is None else f'{control:.2f}'} |")
    return out


def markdown(r: dict[str, Any]) -> str:
    env = r["environment"]
    head = [
        f"# flux-mcp benchmarks ({'quick' if r['quick'] else 'full'} run)",
        "",
        (
            f"`{r['command']}` — {env['date']}, {env['cpus']} CPUs, load {env['load']}, Python {env['python']}, "
            f"mcp {env['mcp']}, flux-mcp {env['flux_mcp']} ({env.get('commit') or 'no commit'}); "
            f"{r['seconds']:.0f} s."
        ),
        "",
    ]
    return "\n".join(head + summary(r) + against(r) + details(r)) + "\n"
