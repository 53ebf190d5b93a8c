"""Helpers for tests of servers as replicas: real gunicorn processes started with the command of
deploy/Dockerfile.cpu, deploy/'s nginx configuration run unprivileged in a temporary prefix, scrapes of
/metrics, and raw websocket upgrades."""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from simple_websocket import ConnectionClosed

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gunicorn_command(port: int) -> list[str]:
    """The CPU image's command (its CMD line), bound to a loopback port."""
    cmd = next(line for line in (DEPLOY / "Dockerfile.cpu").read_text().splitlines() if line.startswith("CMD "))
    argv = json.loads(cmd[4:])
    assert argv[0] == "gunicorn" and "0.0.0.0:8000" in argv
    return [sys.executable, "-m", "gunicorn", *[f"127.0.0.1:{port}" if a == "0.0.0.0:8000" else a for a in argv[1:]]]


def server_env(**settings: str) -> dict[str, str]:
    """The environment of a server process: this checkout's csm_gguf, and `settings` (CSM_GGUF_*)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.update(settings)
    return env


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def wait_ready(base: str, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited ({process.returncode}):\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def nginx_site(port: int, upstreams: str) -> str:
    """deploy/nginx/default.conf.template filled in as the nginx image's entrypoint does (envsubst, which
    fills in ${NAME} and $NAME of the variables it is given, comments included)."""
    template = (DEPLOY / "nginx" / "default.conf.template").read_text()
    values = {"NGINX_PORT": f"127.0.0.1:{port}", "CSM_UPSTREAM_SERVERS": upstreams}
    if shutil.which("envsubst") is None:  # gettext-base; the same for the template's ${NAME}s
        return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], template)
    return subprocess.run(["envsubst", " ".join(f"${{{name}}}" for name in values)], input=template, text=True,
                          env={**os.environ, **values}, capture_output=True, check=True).stdout


def nginx_conf(prefix: Path, site: str) -> Path:
    """A main configuration of the test's own around `site` (a filled-in template): its pid file, logs
    (the template's /var/log/nginx/ too) and temporary files under `prefix`."""
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "site.conf").write_text(site.replace("/var/log/nginx/", f"{prefix}/"))
    temp = "".join(f"{kind}_temp_path {prefix / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                          "scgi"))
    user = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""  # else workers run as nobody
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {prefix / 'nginx.pid'};\nerror_log {prefix / 'error.log'};\n"
        f"events {{ worker_connections 4096; }}\n"
        f"http {{\naccess_log {prefix / 'access.log'};\n{temp}include {prefix / 'site.conf'};\n}}\n")
    return conf


def start_nginx(prefix: Path, port: int, upstreams: list[str]) -> subprocess.Popen:
    """deploy/nginx/default.conf.template, filled in as the nginx image's entrypoint would, inside a main
    configuration of the test's own (nginx_conf)."""
    nginx_conf(prefix, nginx_site(port, " ".join(f"server {u};" for u in upstreams)))
    process = subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e",
                                str(prefix / "error.log")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
        assert process.poll() is None, (prefix / "error.log").read_text()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.1)


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    response = httpx.get(f"{base}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def metric(sample: dict, name: str, **labels) -> float:
    return sample.get((name, tuple(sorted(labels.items()))), 0.0)


UPGRADE = (b"GET /v1/audio/speech/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def upgrade_status(base: str) -> tuple[int, dict]:
    """The status and headers a websocket upgrade gets, read raw (a refused one is no websocket)."""
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(UPGRADE)
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
    lines = head.split(b"\r\n\r\n")[0].decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers


def closed_with(ws, within: float) -> tuple[int, str]:
    """The close code and reason of a websocket the server closes within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            ws.receive(timeout=0.2)
        except ConnectionClosed:
            return ws.close_reason, ws.close_message
    raise AssertionError(f"still open after {within} s")


def close_quietly(ws) -> None:
    try:
        ws.close()
    except ConnectionClosed:  # closed by the server already
        pass
