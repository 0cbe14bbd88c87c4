"""The numbers the pages quote agree with the results files, and the results files with the lab record.

``docs/results/<claim>.json`` holds, per claim of ``docs/reproduction.md``, the runs behind its numbers (each with the
lab record's section, ``benchmarks/RESULTS.md``, and the command) and the scorecard's measured text. Checked here:

* every number in a claim's section of the reproduction page (prose and tables, not commands or equation, figure
  and section references) is one of that claim's recorded numbers;
* each range the scorecard quotes ("lo-hi") is the minimum and maximum over every run that recorded the quantity;
* the scorecard row and the README's claims table quote the results file's verdict, and the scorecard its
  measured text;
* every record a run names is a heading of the lab record, and every number of the run appears in that section
  (its heading up to the next heading of the same or a higher level);
* commands that train (``pyro_vlae.run``) are pinned: they name ``--num-steps`` (and a preset, unless they resume).
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGE = DOCS / "reproduction.md"
README = ROOT / "README.md"
RECORD = ROOT / "benchmarks" / "RESULTS.md"
FILES = sorted((DOCS / "results").glob("*.json"))

NUMBER = re.compile(r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?")
# equation, figure, section and appendix references, digits as classes, layer names (z1, eps3, \epsilon_1), code
# spans, inline maths and links are not quoted numbers
REFERENCE = re.compile(
    r"(?:Eqs?\.|Equ\.|Fig\.|Figs\.|Section|Sections|Proposition|Appendix|Prop\.|Table|C)\s*[\dA-Z][\d.\-–, and]*"
    r"|\d+s\b|\d(?= ↔)|(?<=↔ )\d"  # digits as classes: "on 7s", "0 ↔ 8"
    r"|`[^`]*`|\\?epsilon_\d|z_\{?[\d\w>]+\}?|\bz\d|\beps\d|ε\d|\$[^$]*\$|\[[^\]]*\]\([^)]*\)"
)


def _load(path):
    return json.loads(path.read_text())


def _values(node):
    """Every number in a results file's ``runs`` and ``setup`` (strings like "25-30" give both ends)."""
    if isinstance(node, dict):
        for v in node.values():
            yield from _values(v)
    elif isinstance(node, list):
        for v in node:
            yield from _values(v)
    elif isinstance(node, bool):
        return
    elif isinstance(node, (int, float)):
        yield node
    elif isinstance(node, str):
        for n in NUMBER.findall(node):
            yield float(n.replace(",", ""))


def _recorded(result):
    return {round(float(v), 6) for v in _values([result["runs"], result.get("setup", {}), result["scorecard"]])}


def _sections():
    """Reproduction page sections by their anchor, code blocks removed."""
    text = re.sub(r"```.*?```", "", PAGE.read_text(), flags=re.S)
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {_slug(parts[k]): parts[k + 1] for k in range(1, len(parts), 2)}


def _slug(heading):
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _numbers(text):
    return [float(n.replace(",", "")) for n in NUMBER.findall(REFERENCE.sub(" ", text))]


def _row(text, anchor):
    return next(line for line in text.splitlines() if line.startswith("|") and f"#{anchor})" in line)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_number_of_a_claims_section_is_recorded(path):
    result = _load(path)
    if result.get("pending"):
        pytest.skip(f"{result['claim']}: {result['pending']}")
    section = _sections()[result["section"]]
    recorded = _recorded(result)
    missing = sorted({n for n in _numbers(section) if round(n, 6) not in recorded})
    assert not missing, f"{PAGE.name} section {result['claim']} quotes numbers not in {path.name}: {missing}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_scorecard_ranges_span_every_recorded_run(path):
    result = _load(path)
    for quantity, text in result["ranges"].items():
        values = []
        for run in result["runs"]:
            value = run["numbers"].get(quantity)
            values += list(_values(value)) if value is not None else []
        assert values, f"{path.name}: no run records {quantity}"
        lo, hi = (float(v) for v in text.split("-"))
        assert (lo, hi) == (min(values), max(values)), f"{path.name}: {quantity} spans {min(values)}-{max(values)}"
        assert text in result["scorecard"]["measured"], f"{path.name}: the scorecard should quote {text}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_scorecard_and_readme_quote_the_results_file(path):
    result = _load(path)
    row = _row(PAGE.read_text(), result["section"])
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert result["scorecard"]["measured"] == cells[3], f"scorecard's measured cell for {result['claim']}"
    assert cells[4].startswith(result["verdict"]), f"scorecard's verdict for {result['claim']}"
    assert {round(n, 6) for n in _numbers(row)} <= _recorded(result), f"scorecard row {result['claim']}"
    readme = _row(README.read_text(), result["section"])
    assert f"[{result['verdict']}" in readme, f"README's verdict for {result['claim']}"
    assert {round(n, 6) for n in _numbers(readme)} <= _recorded(result), f"README row {result['claim']}"


def _record_section(record: str, name: str) -> str | None:
    """The lab record's section that a run's ``record`` ``name`` names, from its heading up to the next heading of the
    same or a higher level (``None`` if its first part names no heading).

    ``name`` is a path of headings joined by ": ", each part the start of a heading nested in the one before (a heading
    may hold ": " itself, and ", ..." after a part describes it); the parts after the deepest heading found name a
    passage inside that section (a bullet, not a heading).  Headings inside code blocks are not headings.
    """
    headings, fenced, offset = [], False, 0
    for line in record.splitlines(keepends=True):
        fenced ^= line.startswith("```")
        match = None if fenced else re.match(r"(#+) (.+)$", line)
        if match:
            headings.append((offset, len(match.group(1)), match.group(2).strip()))
        offset += len(line)
    start, end, level, parts, found = 0, len(record), 0, name.split(": "), False
    while parts:
        hit = None
        for k in range(len(parts), 0, -1):  # the longest run of parts that starts a heading inside the section
            text = ": ".join(parts[:k]).strip()
            inside = [h for h in headings if start <= h[0] < end and h[1] > level]
            hit = next((h for t in (text, text.split(",")[0]) for h in inside if h[2].startswith(t)), None)
            if hit:
                break
        if hit is None:
            break
        start, level, parts, found = hit[0], hit[1], parts[k:], True
        end = next((h[0] for h in headings if h[0] > start and h[1] <= level), len(record))
    return record[start:end] if found else None


def _unrecorded(record: str, run: dict) -> list | None:
    """The numbers of ``run`` that its lab-record section does not hold (``None``: it names no section)."""
    section = _record_section(record, run["record"])
    if section is None:
        return None
    held = {round(float(n.replace(",", "")), 6) for n in NUMBER.findall(section)}
    return sorted({round(float(v), 6) for v in _values(run["numbers"])} - held)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_recorded_numbers_are_in_the_lab_record_section_each_run_names(path):
    record = RECORD.read_text()
    for run in _load(path)["runs"]:
        missing = _unrecorded(record, run)
        assert missing is not None, f"{path.name}: {run['run']} names no lab-record section: {run['record']}"
        assert not missing, f"{path.name}: {run['run']} records numbers its section {run['record']!r} lacks: {missing}"


def test_a_number_moved_to_another_section_is_caught():
    """The check reads the named section only (with its subsections): a number moved elsewhere in the record is
    missing, though the record as a whole still holds it."""
    record = "# R\n## Alpha: a\nx 1.5\n### Deep\ny 2.5\n```\n# not a heading\n```\nz 4.5\n## Beta\nw 3.5\n"
    assert _record_section(record, "Alpha").startswith("## Alpha") and "4.5" in _record_section(record, "Alpha")
    assert _record_section(record, "Alpha: Deep: a bullet") == "### Deep\ny 2.5\n```\n# not a heading\n```\nz 4.5\n"
    assert _record_section(record, "Gamma") is None
    run = {"run": "r", "record": "Alpha, its first row", "numbers": {"a": 1.5, "b": "2.5-4.5"}}
    assert _unrecorded(record, run) == []
    moved = record.replace("y 2.5", "y").replace("w 3.5", "w 3.5 2.5")
    assert "2.5" in moved and _unrecorded(moved, run) == [2.5]
    assert _unrecorded(record, {**run, "record": "Beta"}) == [1.5, 2.5, 4.5]


def test_training_commands_on_the_reproduction_page_are_pinned():
    blocks = re.findall(r"```bash\n(.*?)```", PAGE.read_text(), flags=re.S)
    commands = [c for b in blocks for c in b.replace("\\\n", " ").splitlines() if "pyro_vlae.run" in c]
    assert len(commands) >= 4
    for command in commands:
        assert "--num-steps" in command, f"not pinned to a length: {command}"
        assert "--preset" in command or "--resume" in command, f"not pinned to a preset: {command}"


def test_every_claim_has_a_results_file():
    anchors = {_load(p)["section"] for p in FILES}
    headings = set(_sections())
    assert {a for a in headings if re.match(r"c\d-|speed", a)} == anchors
