"""A real ComfyUI server with this pack installed, for the real-server tests (tests/conftest.py's
`comfyui_server` fixture) and tests/make_thumbnails.py --comfyui.

The ComfyUI checkout is not modified: the server runs with --base-directory in a temporary folder whose
custom_nodes/ComfyUI-NUWA links to this repository, so models, inputs, outputs and the user database all
live in that folder.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from _workflows import API_DIR

REPO = Path(__file__).resolve().parent.parent
PACK_LINK_NAME = "ComfyUI-NUWA"
TEST_MODEL = "nuwa_test_tiny.safetensors"
STARTUP_TIMEOUT = float(os.environ.get("COMFYUI_STARTUP_TIMEOUT", "600"))
SHIPPED_RUN_TIMEOUT = float(os.environ.get("NUWA_WORKFLOW_TIMEOUT", "900"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A running ComfyUI: HTTP helpers, a websocket per client id, and prompts queued and followed to their end."""

    def __init__(self, proc: subprocess.Popen, port: int, base: Path, log_path: Path):
        self.proc, self.port, self.base, self.log_path = proc, port, base, log_path
        self.url = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload=None, timeout: float = 30) -> tuple[int, object]:
        data = json.dumps(payload if payload is not None else {}).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return r.status, json.loads(body) if body.strip() else None
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                return err.code, json.loads(body)
            except ValueError:
                return err.code, body.decode(errors="replace")

    def websocket(self, client_id: str | None = None) -> MiniWebSocket:
        return MiniWebSocket("127.0.0.1", self.port, f"/ws?clientId={client_id or uuid.uuid4().hex}")

    def queue(self, prompt: dict, client_id: str) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": client_id})
        assert status == 200, f"POST /prompt answered {status}: {json.dumps(body, indent=1)[:3000]}"
        return body["prompt_id"]

    def follow(self, ws: MiniWebSocket, prompt_id: str, deadline: float, on_message=None) -> list[dict]:
        """Collect this prompt's websocket messages until it succeeds, fails or is interrupted."""
        seen = []
        try:
            for msg in ws.messages(deadline):
                data = msg.get("data") or {}
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                seen.append(msg)
                if on_message is not None:
                    on_message(msg)
                if msg["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    return seen
        except TimeoutError:
            raise AssertionError(f"prompt {prompt_id} did not finish in time; last messages: "
                                 f"{[m['type'] for m in seen][-20:]}\nserver log:\n{self.log()[-3000:]}") from None
        return seen

    def history(self, prompt_id: str, timeout: float = 30) -> dict:
        """The prompt's /history entry. ComfyUI sends execution_success before it files the history
        entry, so it can be missing for a moment right after the websocket says the run finished."""
        deadline = time.monotonic() + timeout
        while True:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history or time.monotonic() > deadline:
                assert prompt_id in history, f"prompt {prompt_id} finished but is not in /history"
                return history[prompt_id]
            time.sleep(0.2)

    def run_prompt(self, prompt: dict, label: str, timeout: float) -> tuple[list[str], dict]:
        """Queue an API prompt, follow it to execution_success (or fail with its last message and the
        server log) -> (websocket message types, its /history outputs)."""
        client_id = uuid.uuid4().hex
        ws = self.websocket(client_id)
        try:
            prompt_id = self.queue(prompt, client_id)
            seen = self.follow(ws, prompt_id, time.monotonic() + timeout)
        finally:
            ws.close()
        types = [m["type"] for m in seen]
        assert types and types[-1] == "execution_success", (
            f"{label}: {json.dumps(seen[-1] if seen else None, indent=1)[:4000]}\nserver log:\n{self.log()[-4000:]}")
        return types, self.history(prompt_id)["outputs"]


class MiniWebSocket:
    """Just enough of RFC 6455 for tests (stdlib only): connect, receive text/binary, answer pings."""

    def __init__(self, host: str, port: int, path: str, timeout: float = 30):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head.decode(errors='replace')}")

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("websocket closed")
            buf += chunk
        return buf

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x80 | opcode])
        header += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self, timeout: float) -> tuple[int, bytes]:
        """Next complete data message as (opcode, payload); 1 = text, 2 = binary."""
        self.sock.settimeout(timeout)
        message, first_opcode = b"", None
        while True:
            b0, b1 = self._exact(2)
            fin, opcode, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._exact(8))[0]
            mask = self._exact(4) if b1 & 0x80 else None
            payload = self._exact(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 9:
                self._send(10, payload)
                continue
            if opcode == 10:
                continue
            if opcode == 8:
                raise ConnectionError("websocket closed by server")
            if opcode != 0:
                first_opcode = opcode
            message += payload
            if fin:
                return first_opcode, message

    def messages(self, deadline: float):
        """Yield JSON messages (dicts) until the deadline; binary preview frames are skipped."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no websocket message before the deadline")
            opcode, payload = self.recv(timeout=left)
            if opcode == 1:
                yield json.loads(payload)

    def close(self) -> None:
        try:
            self._send(8, struct.pack(">H", 1000))
        except OSError:
            pass
        self.sock.close()


def write_test_model(folder: Path) -> None:
    """The tiny random model the real-server tests load, as models/nuwa/nuwa_test_tiny.safetensors."""
    from _tiny import tiny_model  # tests/_tiny.py: random weights, CPU
    folder.mkdir(parents=True, exist_ok=True)
    tiny_model().save(folder / TEST_MODEL)


class ComfyUIStartError(RuntimeError):
    """ComfyUI exited or did not answer while starting."""


@contextlib.contextmanager
def start_comfyui(comfyui_dir: Path, base: Path, python: str | None = None):
    """Start ComfyUI (CPU, a free port) with `base` as its --base-directory and this pack linked into
    base/custom_nodes; yield a ComfyServer once it answers; stop it (its own process group) on exit.
    Also used by tests/make_thumbnails.py --comfyui."""
    python = python or os.environ.get("COMFYUI_PYTHON") or sys.executable
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_LINK_NAME
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    for name in ("input", "output", "temp", "user"):
        (base / name).mkdir(exist_ok=True)
    port = _free_port()
    log_path = base / "comfyui.log"
    cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--disable-auto-launch",
           "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_LINK_NAME]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=comfyui_dir, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    server = ComfyServer(proc, port, base, log_path)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise ComfyUIStartError(f"ComfyUI exited with {proc.returncode} while starting:\n{server.log()[-4000:]}")
            try:
                server.get("/system_stats", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise ComfyUIStartError(f"ComfyUI did not answer within {STARTUP_TIMEOUT:.0f}s:\n{server.log()[-4000:]}")
                time.sleep(1)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: only the server we started
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log_file.close()


def animated_frames(path) -> list:
    """Every video frame of an animated image as RGB PIL images. Encoders (libwebp's) merge a frame
    identical to the one before into it by lengthening its duration: such frames are repeated back."""
    from PIL import Image
    with Image.open(path) as img:
        shown = []
        for i in range(getattr(img, "n_frames", 1)):
            img.seek(i)
            shown.append((img.convert("RGB"), img.info.get("duration") or 0))
    unit = min((d for _, d in shown if d > 0), default=0)
    return [frame for frame, d in shown for _ in range(max(1, round(d / unit)) if unit else 1)]


def run_xl_workflow(server: ComfyServer, name: str) -> tuple[list[str], Path]:
    """Run a shipped NUWA-XL workflow's API copy; (websocket message types, its saved animated WEBP).
    Also used by tests/make_thumbnails.py --comfyui."""
    prompt = json.loads((API_DIR / f"{name}.json").read_text())
    types, outputs = server.run_prompt(prompt, name, SHIPPED_RUN_TIMEOUT)
    saved = [o["images"] for nid, o in outputs.items() if prompt[nid]["class_type"] == "SaveAnimatedWEBP"]
    assert saved and saved[0], f"{name}: SaveAnimatedWEBP produced nothing: {outputs}"
    return types, server.base / "output" / saved[0][0]["subfolder"] / saved[0][0]["filename"]


def browser_env() -> dict | str:
    """The environment a node script needs to drive headless Chromium through playwright-core (NUWA_CHROMIUM and
    NUWA_PLAYWRIGHT_CORE set, found when not given), or why the frontend tests cannot run here."""
    import shutil
    chromium = os.environ.get("NUWA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).is_file():
        return "chromium is not installed (Debian package `chromium`, or set NUWA_CHROMIUM)"
    if shutil.which("node") is None:
        return "node is missing (Debian package `nodejs`)"
    playwright = os.environ.get("NUWA_PLAYWRIGHT_CORE")
    if not playwright:
        found = subprocess.run(["node", "-e", "console.log(require.resolve('playwright-core'))"],
                               capture_output=True, text=True, check=False)
        playwright = found.stdout.strip() if found.returncode == 0 else ""
    if not playwright or not Path(playwright).exists():
        return "playwright-core missing (npm install playwright-core; set NUWA_PLAYWRIGHT_CORE)"
    return dict(os.environ, NUWA_PLAYWRIGHT_CORE=playwright, NUWA_CHROMIUM=chromium)
