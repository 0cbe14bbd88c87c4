"""Results of ``benchmarks/gpu/gpu_check.py``: reading its parts' outputs, and ``summary.md`` from its ``summary.json``.

Nothing here imports torch: the check's own process stays off the GPU.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

MODES = ("hand", "svi", "safe", "graph")  # speed.py's modes, in its order


def cuda_test_results(xml_path: Path) -> dict:
    """Counts (and failing tests) of a pytest JUnit XML report."""
    suite = ET.parse(xml_path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [
        f"{case.get('name')}: {(bad.get('message') or '').splitlines()[0][:200] if bad.get('message') else ''}"
        for case in suite.iter("testcase")
        for bad in list(case.findall("failure")) + list(case.findall("error"))
    ]
    return counts


_VERDICT = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failures", "ERROR": "errors", "SKIPPED": "skipped",
            "XFAIL": "skipped"}  # fmt: skip
_RESULT = re.compile(r"^(\S+::\S+)(?: (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b)?")
_SHORT = re.compile(r"^(FAILED|ERROR) (\S+::\S+)(?: - (.*))?$")


def pytest_log_results(lines: list) -> dict:
    """Counts from the log of ``pytest -v`` (one ``path::test VERDICT`` line per test) when no JUnit report was written:
    a run cut off by SIGTERM or SIGKILL.  A test named without a verdict at the end is where the run was cut off."""
    verdicts, messages = {}, {}
    for line in lines:
        if m := _SHORT.match(line):  # the short summary (-rfE): the failure's message
            messages[m.group(2)] = m.group(3) or ""
        elif m := _RESULT.match(line):
            verdicts[m.group(1)] = m.group(2) or verdicts.get(m.group(1))
    last = next(reversed(verdicts), None)
    cut_in = last if last is not None and verdicts[last] is None else None
    counts = {k: 0 for k in ("tests", "failures", "errors", "skipped", "passed")}
    for v in verdicts.values():
        if v is not None:
            counts["tests"] += 1
            counts[_VERDICT[v]] += 1
    bad = [t for t, v in verdicts.items() if v in ("FAILED", "ERROR")]
    counts["failed_tests"] = [t.rsplit("::", 1)[-1] + (f": {messages[t]}" if messages.get(t) else "") for t in bad]
    return {**counts, "from_log": True, **({"cut_off_in": cut_in} if cut_in else {})}


def last_record(run_dir: Path) -> dict:
    """The last complete record of ``metrics.jsonl`` in a run that may still be writing (``{}`` if none)."""
    path = Path(run_dir) / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    for line in reversed(text[: text.rfind("\n") + 1].splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            return rec
    return {}


def metrics_steps(run_dir: Path) -> int:
    """The last logged step of a run that may still be writing: only complete lines count."""
    return last_record(run_dir).get("step", 0)


def _f(v, fmt="{:.3f}"):
    return "-" if v is None else fmt.format(v) if isinstance(v, (int, float)) else str(v)


def _parts_table(parts: dict) -> list:
    out = [
        "| part | status | seconds | peak GPU memory of the process (allocated / reserved MiB) | "
        "device memory in use, peak (MiB, all processes) | mean GPU utilisation |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in parts.items():
        peak = r.get("peak_gpu") or {}
        alloc = f"{_f(peak.get('allocated_mib'), '{:.0f}')} / {_f(peak.get('reserved_mib'), '{:.0f}')}" if peak else "-"
        util = _f(r.get("utilization_mean_pct"), "{:.0f} %")
        out.append(
            f"| {name} | {r.get('status')} | {_f(r.get('seconds'), '{:.0f}')} | {alloc} | "
            f"{_f(r.get('device_used_peak_mib'), '{:.0f}')} | {util} |"
        )
    return out


def _cell(mode: dict, key="img_s", fmt="{:.0f}") -> str:
    if key in mode:
        return fmt.format(mode[key])
    return "failed" if "error" in mode else "-"


def _ratio(modes, a, b) -> str:
    ra, rb = modes.get(a, {}).get("img_s"), modes.get(b, {}).get("img_s")
    return f"{ra / rb:.2f}" if ra and rb else "-"


def speed_table(rows: list) -> list:
    """speed.py's rows as a Markdown table, then one line per mode that failed or was skipped."""
    out = [
        "| model | preset | batch | hand img/s | SVI img/s | graph-safe img/s | graph img/s | graph steps/s | "
        "graph / SVI | safe / hand | GPU busy SVI / safe / graph | kernel ms/step | limit steps/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r.get("modes") or {}
        busy = " / ".join(_cell(m.get(k, {}), "busy", "{:.0%}") for k in ("svi", "safe", "graph"))
        kern = min((m[k]["kernel_ms"] for k in ("hand", "safe") if "kernel_ms" in m.get(k, {})), default=None)
        out.append(
            f"| {r['model']} | {r['preset']} | {r['batch']} | "
            + " | ".join(_cell(m.get(k, {})) for k in MODES)
            + f" | {_cell(m.get('graph', {}), 'steps_s')} | {_ratio(m, 'graph', 'svi')} | "
            f"{_ratio(m, 'safe', 'hand')} | {busy} | {_f(kern, '{:.2f}')} | {_f(r.get('limit_steps_s'), '{:.0f}')} |"
        )
    notes = [f"- {r['model']} {r['preset']} {r['batch']}: {k}: {v.get('error') or v.get('skipped')}"
             for r in rows for k, v in (r.get("modes") or {}).items() if "error" in v or "skipped" in v]  # fmt: skip
    notes += [f"- {r['model']} {r['preset']} {r['batch']}: the case failed: {r['error']}" for r in rows if "error" in r]
    return out + ([""] + notes if notes else [])


def _paper_scale(res: dict) -> list:
    d = res.get("result") or {}
    p, pack, eq = d.get("plan") or {}, d.get("pack") or {}, d.get("equal_images") or {}
    est = p.get("estimates") or {}
    lines = [
        f"- image size {p.get('size')}x{p.get('size')}, batch {p.get('batch')}: {p.get('why', '-')}",
        "- estimated epochs per shapes3d model before training (measured rates alone on the GPU"
        + (f"; assumed for {p['rates_assumed_for']}" if p.get("rates_assumed_for") else "")
        + "): "
        + ", ".join(f"{s}x{s}: {_f(e.get('epochs'), '{:.1f}')}" for s, e in est.items())
        + "; published budgets: about 40-45 epochs",
        "",
        "| run | status | steps | images | epochs | seconds | last ELBO | last img/s | float16 MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for name, r in (d.get("runs") or {}).items():
        last = r.get("last_metrics") or {}
        flags = [k for k, key in (("capture fallback", "capture_fallback"), ("restarted", "restart")) if r.get(key)]
        lines.append(
            f"| {name} | {r.get('status')} ({r.get('signal') or 'ran to the end'})"
            + "".join(f"; {f}" for f in flags)
            + f" | {r.get('step', '-')} | "
            f"{r.get('images', '-')} | {_f(r.get('epochs'), '{:.2f}')} | {_f(r.get('seconds'), '{:.0f}')} | "
            f"{_f(last.get('elbo'), '{:.1f}')} | {_f(last.get('img_per_s'), '{:.0f}')} | "
            f"{_f((r.get('checkpoint_bytes') or 0) / 2**20, '{:.1f}')} |"
        )
        notes += run_notes(name, r)
    lines += [
        *([""] + notes if notes else []),
        "",
        f"- shapes3d steps {eq.get('steps')}: spread {_f(eq.get('spread'), '{:.2%}')} of the fewest (common target "
        f"step {d.get('target_step', '-')}; the stop reads the metrics every {p.get('log_every')} steps)",
        f"- packed: {', '.join(pack.get('runs') or []) or 'nothing'} in {len(pack.get('parts') or [])} parts, "
        f"{_f((pack.get('archive') or {}).get('bytes', 0) / 2**20, '{:.1f}')} MiB"
        + (f"; left out: {', '.join(pack['left_out'])}" if pack.get("left_out") else "")
        + "; back here: `python benchmarks/gpu/model_pack.py unpack FOLDER --dest runs/paper_scale`",
    ]
    return lines


def run_notes(name: str, r: dict) -> list:
    """One line per fault a training run survived: a failed CUDA graph capture (the run's warning) and a restart."""
    out = []
    if r.get("capture_fallback"):
        out.append(f"- {name}: the CUDA graph capture failed and the run trained eagerly: `{r['capture_fallback']}`")
    rs = r.get("restart")
    if rs:
        first = rs.get("first") or {}
        out.append(
            f"- {name}: exited with code {first.get('rc')} after {_f(first.get('seconds'), '{:.0f}')} s at step "
            f"{first.get('step', 0)}; restarted once with `--cuda-graph off`: {rs.get('how')}"
        )
    elif r.get("not_restarted"):
        out.append(f"- {name}: not restarted: {r['not_restarted']}")
    return out


def _returned(r: dict | None) -> list:
    if not r:
        return []
    verdict = "ok" if r["ok"] else "OVER THE LIMIT"
    return [f"Returned: {len(r['files'])} files, {r['total_mib']} MiB (at most 8 and 64 MiB): {verdict}."]


def render_markdown(s: dict) -> str:
    dev, parts = s.get("device") or {}, s.get("parts") or {}
    lines = [
        "# GPU check" + (" (dry run on the CPU)" if s.get("dry_run") else ""),
        "",
        f"Device: {dev.get('gpu', 'no GPU')} ({_f(dev.get('gpu_memory_gib'), '{:.0f}')} GiB), torch {dev.get('torch')} "
        f"(CUDA {dev.get('torch_cuda')}), pyro {dev.get('pyro')}, Python {dev.get('python')}. Data: {dev.get('data')}.",
        f"Command: `{s.get('command')}`; budget {s.get('budget_s')} s, elapsed {s.get('elapsed_s')} s"
        + ("" if "all_ok" not in s else f"; every part ok: {s['all_ok']}")
        + ".",
        *([f"**error: {s['error']}**"] if s.get("error") else []),
        *([f"**{s['stopped']}**"] if s.get("stopped") else []),
        *(
            [f"Process groups still running at the end, stopped: {s['leftover_groups']}."]
            if s.get("leftover_groups")
            else []
        ),  # fmt: skip
        *_returned(s.get("returned")),
        "",
        *_parts_table(parts),
    ]
    if parts.get("speed", {}).get("rows"):
        lines += [
            "",
            "## Training step in four modes (benchmarks/speed/speed.py)",
            "",
            *speed_table(parts["speed"]["rows"]),
        ]
    ct = parts.get("cuda_tests")
    if ct:
        lines += ["", "## CUDA tests", "", f"{ct.get('passed', 0)} passed, {ct.get('failures', 0)} failed, "
                  f"{ct.get('errors', 0)} errors, {ct.get('skipped', 0)} skipped of {ct.get('tests', 0)}"
                  + (" (counted from the log: no report was written)" if ct.get("from_log") else "")
                  + (f"; cut off in {ct['cut_off_in']}" if ct.get("cut_off_in") else "")]  # fmt: skip
        lines += [f"- {t}" for t in ct.get("failed_tests", [])]
    if "paper_scale" in parts:
        lines += [
            "",
            "## The paper at the paper's scale (benchmarks/gpu/paper_scale.py)",
            "",
            *_paper_scale(parts["paper_scale"]),
        ]
    return "\n".join(lines) + "\n"
