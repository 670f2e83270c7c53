"""A read-only Hugging Face Hub on 127.0.0.1 for tests: `olah` serving local git repos as a mirror.

Usage: ``with OlahMirror(tmp_dir) as hubsrv: hubsrv.commit_folder("org/repo", folder); hubsrv.endpoint``.
The server runs in a subprocess (bounded startup wait, killed on exit); clients must reach it with
``HF_ENDPOINT=hubsrv.endpoint`` set *before* huggingface_hub is imported, hence ``run_client``, which runs
a snippet in a fresh interpreter. Nothing leaves the loopback interface.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git(cwd: str, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


class OlahMirror:
    """olah on a free loopback port with ``offline = true`` and ``<root>/mirrors/models/<org>/<repo>`` git repos."""

    def __init__(self, root: str, startup_timeout: float = 60.0):
        pytest.importorskip("olah", reason="olah (read-only Hub mirror server) is not installed")
        if shutil.which("git") is None:
            pytest.skip("git is not installed")
        self.root = os.fspath(root)
        self.mirrors = os.path.join(self.root, "mirrors")
        os.makedirs(os.path.join(self.mirrors, "models"), exist_ok=True)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> OlahMirror:
        cfg = os.path.join(self.root, "olah.toml")
        with open(cfg, "w") as f:
            f.write(
                "[basic]\n"
                f'host = "127.0.0.1"\nport = {self.port}\n'
                f'repos-path = "{os.path.join(self.root, "repos")}"\n'
                f'mirror-netloc = "127.0.0.1:{self.port}"\nmirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
                f'mirrors-path = ["{self.mirrors}"]\n'
                "[accessibility]\noffline = true\n"
            )
        self.log = open(os.path.join(self.root, "olah.log"), "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "olah.server", "-c", cfg], cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.__exit__()
                pytest.fail(f"olah exited with {self.proc.returncode}; log: {self._log_tail()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.2)
        self.__exit__()
        pytest.fail(f"olah did not listen on port {self.port} within {self.startup_timeout}s; log: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.root, "olah.log")) as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "log", None):
            self.log.close()

    def commit_folder(self, repo_id: str, folder: str, message: str = "upload") -> str:
        """Replace the repo's tree with ``folder``'s files, commit on ``main``; returns the commit sha."""
        repo = os.path.join(self.mirrors, "models", *repo_id.split("/"))
        if not os.path.isdir(os.path.join(repo, ".git")):
            os.makedirs(repo, exist_ok=True)
            _git(repo, "init", "-q", "-b", "main")
        for name in os.listdir(repo):
            if name != ".git":
                p = os.path.join(repo, name)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        for name in os.listdir(folder):
            src = os.path.join(folder, name)
            size = os.path.getsize(src)
            if 121 <= size <= 149 and not name.endswith((".json", ".md")):
                raise RuntimeError(f"{name}: olah returns 500 for binary files of ~121-149 bytes ({size})")
            shutil.copy2(src, os.path.join(repo, name))
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", message)
        return _git(repo, "rev-parse", "HEAD")

    def run_client(self, code: str, hf_home: str, timeout: float = 120.0) -> str:
        """Run ``code`` in a fresh python with HF_ENDPOINT pointing at this server; returns stdout."""
        env = {**os.environ, "HF_ENDPOINT": self.endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": hf_home,
               "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "HF_TOKEN"):
            env.pop(k, None)
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise AssertionError(f"client failed ({r.returncode}):\n{r.stderr[-3000:]}\nserver log:\n{self._log_tail()}")
        return r.stdout
