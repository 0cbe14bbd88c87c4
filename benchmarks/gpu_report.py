"""Results of ``benchmarks/gpu_check.py``: reading its parts' outputs, and ``summary.md`` from its ``summary.json``.

Nothing here imports torch: the check's own process stays off the GPU.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

SLOW_RATIO = 0.8  # the issue's bar: investigate a Pyro step slower than this fraction of the hand-written one


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


def speed_rate(speed_json: Path, dry_run: bool) -> float | None:
    """SVI steps per second of the VLAE at the default job's preset and batch, from speed.py's records."""
    if not speed_json.exists():
        return None
    want = ("tiny", 16) if dry_run else ("mnist", 100)
    for row in json.loads(speed_json.read_text())["rows"]:
        if row["model"] == "vlae" and (row["preset"], row["batch"]) == want:
            return row["pyro_img_s"] / row["batch"]
    return None


def metrics_steps(run_dir: Path) -> int:
    """The last logged step of a run that may still be writing: only complete lines count."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    for line in reversed(text[: text.rfind("\n") + 1].splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def _f(v, fmt="{:.3f}"):
    return "-" if v is None else fmt.format(v) if isinstance(v, (int, float)) else str(v)


def _layers(d: dict | None, fmt="{:.3f}") -> str:
    return " / ".join(f"{k} {_f(v, fmt)}" for k, v in (d or {}).items()) or "-"


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


def _speed(rows: list) -> list:
    out = [
        "| model | preset | batch | Pyro img/s | hand-written img/s | Pyro / hand | loss diff / rel. grad diff | "
        "generation img/s | IWAE img/s | peak GPU MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flag = " (below 0.8)" if r["pyro_over_hand"] < SLOW_RATIO else ""
        out.append(
            f"| {r['model']} | {r['preset']} | {r['batch']} | {r['pyro_img_s']:.0f} | {r['hand_img_s']:.0f} | "
            f"{r['pyro_over_hand']:.3f}{flag} | {r['loss_diff']:.1e} / {r['rel_grad_diff']:.1e} | "
            f"{r['generation_img_s']:.0f} | "
            f"{r['iwae_img_s']:.2f} (K={r['iwae_k']}) | "
            f"{_f(r.get('peak_gpu_mib'), '{:.0f}')} |"
        )
    return out


def _default_job(r: dict) -> list:
    ev = r.get("eval") or {}
    test = (ev.get("evaluation") or {}).get("test") or {}
    lik = test.get("likelihood") or {}
    layers = (ev.get("layers") or {}).get("layers") or {}
    probes = {k: v.get("test_accuracy") for k, v in (test.get("probes") or {}).items()}
    return [
        f"- preset {r.get('preset')}, {ev.get('step', '-')} steps (planned {r.get('steps_planned')}), training "
        f"{_f(ev.get('train_seconds'), '{:.0f}')} s (sharing the GPU with the paper run)",
        f"- test ELBO {_f(lik.get('elbo'), '{:.1f}')} nats, IWAE log p(x) >= {_f(lik.get('iwae'), '{:.1f}')} "
        f"(K = {lik.get('num_samples', '-')}), classifier accuracy "
        f"{_f((test.get('classifier') or {}).get('test_accuracy'))}",
        f"- class-change rate when one layer is resampled: "
        f"{_layers({k: v.get('class_change_rate') for k, v in layers.items()})} "
        f"(independent samples: {_f((ev.get('layers') or {}).get('baseline_class_change_rate'))})",
        f"- linear-probe accuracy: {_layers(probes)}",
        f"- figure: {r.get('figure') or '-'}",
    ]


def _paper(parts: dict) -> list:
    r, probe = parts.get("paper", {}), (parts.get("hierarchy_probe") or {}).get("probe") or {}
    cfg = r.get("config") or {}
    t = cfg.get("train") or {}
    return [
        f"- `--preset {cfg.get('preset')}` (Adam {t.get('lr')}, KL scale {t.get('anneal')}, ELBO {t.get('elbo')}, "
        f"fade-in {t.get('fade_in')}, batch {t.get('batch_size')}): {r.get('steps', '-')} steps of "
        f"{t.get('num_steps')} in {_f(r.get('seconds'), '{:.0f}')} s ({r.get('signal') or 'ran to the end'})",
        f"- class-change rate when one layer is resampled (hierarchy_probe.py, at step {probe.get('step', '-')}): "
        f"{_layers(probe.get('class_change'))}; a clean hierarchy has a low rate for z1 and a high one for z3",
        f"- pixel-variance share: {_layers(probe.get('variance_share'))}; classifier accuracy "
        f"{_f(probe.get('classifier_accuracy'))}",
        f"- figure: {(parts.get('paper_figures') or {}).get('figure') or '-'}",
    ]


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
        "",
        *_parts_table(parts),
    ]
    if "speed" in parts and parts["speed"].get("rows"):
        lines += ["", "## Training step, generation, IWAE (benchmarks/speed.py)", "", *_speed(parts["speed"]["rows"])]
    ct = parts.get("cuda_tests")
    if ct:
        lines += ["", "## CUDA tests", "", f"{ct.get('passed', 0)} passed, {ct.get('failures', 0)} failed, "
                  f"{ct.get('errors', 0)} errors, {ct.get('skipped', 0)} skipped of {ct.get('tests', 0)}"]  # fmt: skip
        lines += [f"- {t}" for t in ct.get("failed_tests", [])]
    if "default_job" in parts:
        lines += [
            "",
            "## Default job (`python -m pyro_vlae.run --model vlae`, bounded)",
            "",
            *_default_job(parts["default_job"]),
        ]
    if "paper" in parts:
        lines += ["", "## Plain VLAE at the paper's scale", "", *_paper(parts)]
    return "\n".join(lines) + "\n"
