"""The package builds as a distribution and installs as users install it (`pip install hf-taujp`):
sdist + wheel from this tree, the wheel into a fresh virtual environment, then the console script and
the import run from there. Dependencies (torch, transformers, ...) come from the environment running the tests
(a virtual environment or not): its site-packages folders are put on the new environment's path by a plain `.pth`
file, so its `.pth` files (among them the editable install of this tree) are not processed, and the wheel is
installed with --no-deps: the point is what the wheel itself contains (modules, the GLUE sample, the entry point,
the version)."""

import json
import os
import site
import subprocess
import sys
import sysconfig
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
    # Not --system-site-packages: that is the *base* interpreter's site-packages, which holds the dependencies
    # only when they were installed there (not in a fresh venv running these tests).
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    own = subprocess.run([str(py), "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         check=True, capture_output=True, text=True, timeout=300).stdout.strip()
    deps = [p for p in dict.fromkeys(site.getsitepackages() + [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
            if os.path.isdir(p)]
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        deps.append(site.getusersitepackages())  # `pip install --user` dependencies
    with open(os.path.join(own, "_test_deps.pth"), "w") as f:
        f.write("".join(p + "\n" for p in deps))  # plain paths, appended after the venv's own site-packages
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -I: no user site, no cwd on the path, so the import must come from the venv's own site-packages; the
    # folders of the .pth file come after it, and the editable install's finder in them is never loaded.
    probe = ("import json, sys, hf_taujp, hf_taujp.recipes, torch; "
             "print(json.dumps([hf_taujp.__file__, sys.path, [type(f).__module__ for f in sys.meta_path]]))")
    where = subprocess.run([str(py), "-I", "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert where.returncode == 0, where.stderr
    file, path, finders = json.loads(where.stdout)
    assert file.startswith(own), file
    assert not any("editable" in f for f in finders), finders
    # the path is the standard library (the path without `site`), the venv's own site-packages, then the .pth's
    # folders: nothing else (not the base interpreter's site-packages, not this tree)
    bare = json.loads(subprocess.run([str(py), "-I", "-S", "-c", "import json, sys; print(json.dumps(sys.path))"],
                                     check=True, capture_output=True, text=True, timeout=300, env=env).stdout)
    assert path == bare + [own] + deps, (path, bare, own, deps)
    cli = env_dir / "bin" / "hf-taujp"
    out = subprocess.run([str(cli), "--help"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and "glue" in out.stdout and "merge" in out.stdout
    ver = subprocess.run([str(cli), "--version"], capture_output=True, text=True, timeout=300, env=env)
    from hf_taujp import __version__

    assert ver.stdout.strip() == f"hf-taujp {__version__}"
