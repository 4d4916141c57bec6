"""What a user or the registry meets before any code runs: the project metadata, the license, and
the benchmark scripts run as documented (`python benchmarks/X.py` from the repository root)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARK_SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))


# One process for every script (torch is imported once): before each, sys.path is what
# `python benchmarks/X.py` gives (the script's folder, not the root) and the package is forgotten, so
# a script that cannot find `wanvideo` by itself fails here as it does for a user.
HELP_DRIVER = """
import os, runpy, sys
root, names = sys.argv[1], sys.argv[2:]
scripts = os.path.join(root, "benchmarks")
base = [p for p in sys.path if p not in ("", root, scripts) and os.path.abspath(p) != root]
failed = []
for name in names:
    sys.path[:] = [scripts] + base
    for module in [m for m in sys.modules if m.split(".")[0] in ("wanvideo", "bench_model", "multi_gpu_utils")]:
        del sys.modules[module]
    sys.argv = [os.path.join(scripts, name), "--help"]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        failed.append(f"{name}: ran without --help exiting")
    except SystemExit as exit_info:
        if exit_info.code not in (0, None):
            failed.append(f"{name}: exit {exit_info.code}")
    except BaseException as error:
        failed.append(f"{name}: {type(error).__name__}: {error}")
print("FAILED", failed)
sys.exit(1 if failed else 0)
"""


def test_every_benchmark_script_runs_as_documented(tmp_path):
    """`python benchmarks/X.py --help` from the root, without PYTHONPATH and without a GPU: each script's
    imports (wanvideo included) resolve, and nothing runs before the arguments are read."""
    assert "bench_model.py" in BENCHMARK_SCRIPTS and "header_only_checkpoint.py" in BENCHMARK_SCRIPTS
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", HELP_DRIVER, str(ROOT), *BENCHMARK_SCRIPTS], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("usage:") == len(BENCHMARK_SCRIPTS)


def test_header_only_checkpoint_writes_a_file_the_planner_reads(tmp_path, monkeypatch):
    import runpy
    from wanvideo.checkpoint import inspect_checkpoint
    script = str(ROOT / "benchmarks" / "header_only_checkpoint.py")
    path = tmp_path / "wan2.1_t2v_1.3B_bf16.safetensors"
    monkeypatch.setattr(sys, "argv", [script, "1.3B", str(path)])
    runpy.run_path(script, run_name="__main__")
    info = inspect_checkpoint(path)
    assert info.num_layers == 30 and info.config["dim"] == 1536
    monkeypatch.setattr(sys, "argv", [script, "2B", str(path)])
    with pytest.raises(SystemExit) as exit_info:  # argparse's refusal, not an IndexError or KeyError
        runpy.run_path(script, run_name="__main__")
    assert exit_info.value.code == 2


def test_pyproject_leaves_torch_to_the_host_and_names_no_comfyui():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[ <>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower()
             for requirement in project["dependencies"]]
    assert "torch" not in names  # ComfyUI's own torch (CUDA, ROCm, ...) must not be replaced by pip
    assert "comfyui" not in project["name"].lower()  # the registry's advice for custom-node names
    requirements = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert not [r for r in requirements if re.match(r"torch\b", r)]


def test_license_is_the_apache_license_pyproject_names():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "Apache-2.0" in str(project["license"])
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text and "END OF TERMS AND CONDITIONS" in text
