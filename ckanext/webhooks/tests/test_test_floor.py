"""scripts/test-floor: scripts/test-all (so CI) fails when fewer tests ran on
a CKAN version than .ci/test-floor keeps for it. Fed JUnit reports made
here, in the shape pytest writes them."""
from __future__ import annotations

import subprocess
from pathlib import Path

from . import processes

ROOT = processes.ROOT
FLOOR_CHECK = ROOT / "scripts" / "test-floor"


def _report(directory: Path, run: str, tests: int, skipped: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    cases = "".join(f'<testcase classname="t" name="test_{n}" time="0.1"/>'
                    for n in range(tests))
    path = directory / f"junit-{run}.xml"
    path.write_text(f'<?xml version="1.0" encoding="utf-8"?><testsuites>'
                    f'<testsuite name="pytest" errors="0" failures="0" skipped="{skipped}" '
                    f'tests="{tests}" time="1.0">{cases}</testsuite></testsuites>')
    return path


def _check(floor: Path, dirs: dict[str, Path | list[Path]]) -> subprocess.CompletedProcess:
    """scripts/test-floor on the reports in ``dirs`` ({CKAN version: its
    directory, or the directories of its parts})."""
    def joined(paths) -> str:
        return ",".join(map(str, paths)) if isinstance(paths, list) else str(paths)
    return subprocess.run([str(FLOOR_CHECK), str(floor),
                           *(f"{version}={joined(path)}" for version, path in dirs.items())],
                          capture_output=True, text=True, timeout=30)


def test_a_version_below_its_floor_fails_the_check(tmp_path):
    floor = tmp_path / "floor"
    floor.write_text("# comment\n2.12 10\n2.11 10  # and one here\n")
    v212, v211 = tmp_path / "ckan-2.12-slot1", tmp_path / "ckan-2.11-slot2"
    _report(v212, "suite", 8)
    _report(v212, "exclusive", 2)
    suite_211 = _report(v211, "suite", 10, skipped=1)
    _report(v211, "exclusive", 1)
    at_floor = _check(floor, {"2.12": v212, "2.11": v211})
    assert at_floor.returncode == 0, at_floor.stdout + at_floor.stderr
    assert "tests run on CKAN 2.11: 10 (floor 10): ok" in at_floor.stdout

    # A file that is no longer collected: fewer tests in 2.11's report.
    _report(v211, "suite", 9, skipped=1)
    below = _check(floor, {"2.12": v212, "2.11": v211})
    assert below.returncode == 1
    assert "tests run on CKAN 2.11: 9 (floor 10): BELOW THE FLOOR" in below.stdout
    assert "tests run on CKAN 2.12: 10 (floor 10): ok" in below.stdout

    # A version run in two parts: the sum of both directories.
    part = tmp_path / "ckan-2.11-slot4"
    _report(part, "suite", 1)
    split = _check(floor, {"2.12": v212, "2.11": [v211, part]})
    assert split.returncode == 0, split.stdout + split.stderr
    assert "tests run on CKAN 2.11: 10 (floor 10): ok" in split.stdout
    part_report = part / "junit-suite.xml"
    part_report.unlink()  # the second part broke off
    assert _check(floor, {"2.12": v212, "2.11": [v211, part]}).returncode == 1

    suite_211.unlink()  # a run that broke off before writing its report
    assert _check(floor, {"2.12": v212, "2.11": v211}).returncode == 1
    assert _check(floor, {"2.12": v212}).returncode == 2  # a version left unchecked


def test_the_floor_kept_in_the_repository_is_checked(tmp_path):
    """.ci/test-floor names both versions, and one test fewer than either
    floor fails."""
    kept = ROOT / ".ci" / "test-floor"
    floors = dict(line.split("#")[0].split() for line in kept.read_text().splitlines()
                  if line.split("#")[0].strip())
    assert set(floors) == {"2.12", "2.11"}
    dirs = {version: tmp_path / version for version in floors}
    for version, floor in floors.items():
        _report(dirs[version], "suite", int(floor))
    assert _check(kept, dirs).returncode == 0
    for version, floor in floors.items():
        _report(dirs[version], "suite", int(floor) - 1)
        assert _check(kept, dirs).returncode == 1
        _report(dirs[version], "suite", int(floor))
