"""A real ComfyUI server for tests: started on loopback with the pack, driven over HTTP.

`comfy_server()` starts `main.py --cpu` from the checkout in COMFYUI_PATH with the test's
own interpreter, in a temporary base directory (custom_nodes/, models/, output/, user/)
holding a symlink to this repository under a hyphenated folder name, as users clone it.
Tests skip when COMFYUI_PATH is unset or this Python lacks ComfyUI's requirements. Nothing
is written into the checkout: byte code goes to a cache outside it (PYTHONPYCACHEPREFIX), and
the database (which defaults to `<checkout>/user/comfyui.db`) is in memory.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACK_FOLDER = "comfyui-act"  # a hyphen, as in a clone: not importable as a plain name
CHECKPOINT_NAME = "v1-5-pruned-emaonly.safetensors"
HOST = "127.0.0.1"  # loopback only
# ComfyUI's default database is <checkout>/user/comfyui.db whatever --base-directory says
IN_MEMORY_DATABASE = "sqlite:///:memory:"
# the server's byte code: outside the checkout, and kept between runs (imports 3x faster)
DEFAULT_PYCACHE = Path(tempfile.gettempdir()) / "act_comfy_pycache"
PYCACHE = os.environ.get("PYTHONPYCACHEPREFIX") or str(DEFAULT_PYCACHE)


class PromptError(RuntimeError):
    """ComfyUI refused a prompt (HTTP error or node_errors) or failed while running it."""

    def __init__(self, message: str, node_errors: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.node_errors = node_errors or {}


def comfyui_checkout() -> Path:
    """The ComfyUI checkout in COMFYUI_PATH, runnable by this Python; else skip the test."""
    path = os.environ.get("COMFYUI_PATH")
    if not path or not (Path(path) / "main.py").is_file():
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout to run the ComfyUI server tests")
    missing = missing_requirements(Path(path) / "requirements.txt")
    if missing:
        pytest.skip(f"{sys.executable} lacks ComfyUI's requirements: {', '.join(missing)}")
    return Path(path)


def missing_requirements(requirements: Path) -> list[str]:
    """Distributions named in ComfyUI's requirements.txt (essential part) not installed here."""
    missing = []
    for line in requirements.read_text().splitlines():
        if "non essential" in line:
            break
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#", 1)[0])
        if name is None:
            continue
        try:
            importlib.metadata.distribution(name.group(1))
        except importlib.metadata.PackageNotFoundError:
            missing.append(name.group(1))
    return missing


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class ComfyServer:
    """A running ComfyUI server: its URL, base directory and log, and the HTTP calls tests use."""

    def __init__(self, process: subprocess.Popen, port: int, base: Path, log: Path) -> None:
        self.process = process
        self.url = f"http://{HOST}:{port}"
        self.base = base
        self.log = log
        self.client_id = uuid.uuid4().hex

    def log_tail(self, characters: int = 4000) -> str:
        """The end of the server's output (for failure messages)."""
        return self.log.read_text(errors="replace")[-characters:]

    def request(self, route: str, payload: Any = None, timeout: float = 60) -> Any:
        """GET `route` (or POST `payload` as JSON) and decode the JSON answer.

        Raises:
            urllib.error.HTTPError: the server answered with an error status.
        """
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.url + route, data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def request_bytes(self, route: str, timeout: float = 60) -> bytes:
        """GET `route`: the answer's bytes (a served file)."""
        with urllib.request.urlopen(self.url + route, timeout=timeout) as response:
            return response.read()

    def object_info(self, node_id: str | None = None) -> dict[str, Any]:
        """GET /object_info (every node) or /object_info/<node_id> (that node's entry)."""
        if node_id is None:
            return self.request("/object_info")
        return self.request(f"/object_info/{node_id}")[node_id]

    def queue(self, prompt: dict[str, Any], extra_data: dict[str, Any] | None = None) -> str:
        """POST an API-format prompt to /prompt; returns its prompt_id.

        Raises:
            PromptError: an HTTP error, or node_errors in the answer (ComfyUI then still runs
                the valid outputs), with the error messages and `node_errors`.
        """
        payload = {"prompt": prompt, "client_id": self.client_id, "extra_data": extra_data or {}}
        try:
            answer = self.request("/prompt", payload)
        except urllib.error.HTTPError as error:
            body = error.read().decode(errors="replace")
            try:
                answer = json.loads(body)
            except ValueError:
                raise PromptError(f"/prompt answered HTTP {error.code}: {body[:2000]}") from None
            raise PromptError(
                f"/prompt answered HTTP {error.code}: {describe_refusal(answer)}",
                answer.get("node_errors"),
            ) from None
        if answer.get("node_errors"):
            raise PromptError(
                f"/prompt reported node errors: {describe_refusal(answer)}", answer["node_errors"]
            )
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 180) -> dict[str, Any]:
        """Poll /history/<prompt_id> until the prompt is done; returns {"status", "outputs"}.

        Raises:
            PromptError: the prompt failed (the message names the node and the exception).
            TimeoutError: not done within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.request(f"/history/{prompt_id}", timeout=30).get(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("completed") or status.get("status_str") == "error":
                if status.get("status_str") != "success":
                    raise PromptError(f"prompt {prompt_id} failed: {describe_failure(status)}")
                return {"status": status, "outputs": entry.get("outputs", {})}
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited while running a prompt:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} not done after {timeout} s:\n{self.log_tail()}")

    def run(self, prompt: dict[str, Any], timeout: float = 180) -> dict[str, Any]:
        """Queue a prompt and wait for it: {"status", "outputs"} of a successful run."""
        return self.wait(self.queue(prompt), timeout)

    def output_files(self, outputs: dict[str, Any], node_id: str) -> list[Path]:
        """Paths of the images (or other files) a node such as SaveImage wrote."""
        files = outputs.get(node_id, {}).get("images", [])
        return [self.base / item["type"] / item["subfolder"] / item["filename"] for item in files]


def describe_refusal(answer: dict[str, Any]) -> str:
    """One line per error of a refused /prompt answer: node, class, message, input."""
    error = answer.get("error") or {}
    lines = [f"{error.get('message', '')} {error.get('details', '')}".strip()]
    for node_id, entry in (answer.get("node_errors") or {}).items():
        for item in entry.get("errors", []):
            lines.append(
                f"node {node_id} ({entry.get('class_type')}): {item.get('message')}: "
                f"{item.get('details')}"
            )
    return "; ".join(line for line in lines if line)


def describe_failure(status: dict[str, Any]) -> str:
    """The execution_error message of a failed prompt's history status."""
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return (
                f"node {data.get('node_id')} ({data.get('node_type')}) raised "
                f"{data.get('exception_type')}: {data.get('exception_message')}\n"
                + "".join(data.get("traceback") or [])
            )
    return json.dumps(status)[:2000]


def prepare_base(
    base: Path,
    checkpoint: Path | None,
    models: Mapping[str, Path] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> None:
    """custom_nodes/<pack> as a symlink to this repository; the checkpoint under its SD name;
    more model files (`models`: path under models/ -> file, symlinked); the front end's user
    settings (`settings`, written to user/default/comfy.settings.json)."""
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(ROOT, target_is_directory=True)
    files = dict(models or {})
    if checkpoint is not None:
        files[f"checkpoints/{CHECKPOINT_NAME}"] = checkpoint
    for name, source in files.items():
        link = base / "models" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(source).resolve())
    if settings:
        user = base / "user" / "default"
        user.mkdir(parents=True)
        (user / "comfy.settings.json").write_text(json.dumps(dict(settings), indent=2))


def wait_until_ready(server: ComfyServer, timeout: float) -> None:
    """Poll /system_stats until it answers; fail early with the log if the server exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited during start-up:\n{server.log_tail()}")
        with contextlib.suppress(OSError):
            server.request("/system_stats", timeout=5)
            return
        time.sleep(0.3)
    raise TimeoutError(f"ComfyUI not ready after {timeout} s:\n{server.log_tail()}")


def stop(process: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM the server (its own pid only), then kill it if it does not exit in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=grace)


@contextlib.contextmanager
def comfy_server(
    checkpoint: Path | None = None,
    *,
    threads: int | None = 1,
    ready_timeout: float = 120,
    extra_args: tuple[str, ...] = (),
    models: Mapping[str, Path] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Iterator[ComfyServer]:
    """Start ComfyUI on a free loopback port with this pack; always stop it and clean up.

    Args:
        checkpoint: placed (symlinked) as models/checkpoints/v1-5-pruned-emaonly.safetensors.
        threads: torch's CPU threads in the server (None: torch's default, one per core). One
            thread was 15x faster on 2 cores shared with other jobs: busy OpenMP threads
            spin against each other.
        ready_timeout: seconds to wait for the server to answer.
        extra_args: more command-line options for main.py.
        models: more files for models/, as {"checkpoints/sd_xl_base_1.0.safetensors": path}
            (symlinked; ComfyUI lists them in its loaders' combos).
        settings: front-end user settings, e.g. {"Comfy.TutorialCompleted": True}.
    """
    comfyui = comfyui_checkout()
    base = Path(tempfile.mkdtemp(prefix="act-comfyui-server-"))
    process = None
    try:
        prepare_base(base, checkpoint, models, settings)
        port = free_port()
        environment = {**os.environ, "PYTHONPYCACHEPREFIX": PYCACHE}
        environment.pop("PYTHONDONTWRITEBYTECODE", None)  # byte code is cached outside
        if threads is not None:
            environment.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        command = [
            sys.executable, str(comfyui / "main.py"), "--cpu", "--listen", HOST,
            "--port", str(port), "--disable-auto-launch", "--disable-api-nodes",
            "--base-directory", str(base), "--database-url", IN_MEMORY_DATABASE, *extra_args,
        ]  # fmt: skip
        log = base / "server.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                command, cwd=base, env=environment, stdout=output, stderr=subprocess.STDOUT
            )
        server = ComfyServer(process, port, base, log)
        wait_until_ready(server, ready_timeout)
        yield server
    finally:
        if process is not None:
            stop(process)
        shutil.rmtree(base, ignore_errors=True)  # removes the symlinks, not their targets
