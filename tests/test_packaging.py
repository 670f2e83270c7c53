"""The package builds as a distribution and installs as users install it (`pip install hf-taujp`):
sdist + wheel from this tree, the wheel into a fresh virtual environment, then the console script and
the import run from there. Dependencies come from the test machine (--system-site-packages, --no-deps):
the point is what the wheel itself contains (modules, the GLUE sample, the entry point, the version)."""

import os
import subprocess
import sys
import venv
import zipfile

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: build with the installed setuptools (no download).
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), ROOT],
                   check=True, capture_output=True, text=True, timeout=600)
    wheel = next(out.glob("hf_taujp-*.whl"))
    sdist = next(out.glob("hf_taujp-*.tar.gz"))
    return wheel, sdist


def test_wheel_contains_the_package_data_and_metadata(dists):
    from hf_taujp import __version__

    wheel, sdist = dists
    assert f"-{__version__}" in wheel.name and f"-{__version__}" in sdist.name
    names = zipfile.ZipFile(wheel).namelist()
    for task in ("CoLA", "SST-2", "MRPC", "RTE"):
        assert f"hf_taujp/recipes/data/glue_sample/{task}/dev.tsv" in names
    assert "hf_taujp/recipes/data/glue_sample/SOURCE.md" in names
    assert not any(n.startswith("tests/") for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    assert "Requires-Dist: peft" in meta and "Provides-Extra: offline" in meta
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/entry_points.txt"))).decode()
    assert "hf-taujp = hf_taujp.cli:main" in entry


def test_wheel_installs_into_a_fresh_venv_and_runs(dists, tmp_path):
    wheel, _ = dists
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -I: no user site, no cwd on the path, so the import must come from the venv's own site-packages
    # (the test machine's editable install of this tree would otherwise answer).
    where = subprocess.run([str(py), "-I", "-c", "import hf_taujp, hf_taujp.recipes; print(hf_taujp.__file__)"],
                           capture_output=True, text=True, timeout=300, env=env)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(env_dir)), where.stdout
    cli = env_dir / "bin" / "hf-taujp"
    out = subprocess.run([str(cli), "--help"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and "glue" in out.stdout and "merge" in out.stdout
    ver = subprocess.run([str(cli), "--version"], capture_output=True, text=True, timeout=300, env=env)
    from hf_taujp import __version__

    assert ver.stdout.strip() == f"hf-taujp {__version__}"
