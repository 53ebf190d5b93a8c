"""Replicas behind a load balancer, as deployed: deploy/'s nginx configuration in front of two gunicorn
processes (the CPU image's command) on loopback that share a voices folder, serving the tiny model.
Also the drain under `flask run`, and slow or idle clients held off by nginx (issue 21, item 2)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

import httpx
import numpy as np
import pytest
import soundfile as sf
from simple_websocket import Client as WsClient

from replica_fixtures import (
    close_quietly,
    closed_with,
    free_port,
    gunicorn_command,
    metric,
    nginx_conf,
    nginx_site,
    scrape,
    server_env,
    start,
    start_nginx,
    stop,
    upgrade_status,
    wait_ready,
)

MAX_WEBSOCKETS, IDLE_S = 8, 3
SHORT = {"model": "csm-1b", "input": "Hello there.", "response_format": "pcm", "temperature": 0, "max_audio_ms": 400}
# The tiny model's longest speech: sampled with a seed that does not end it early (greedy ends at once).
LONG_PCM = {**SHORT, "input": "Hello there, how are you doing today? I am fine, thank you, and you?",
            "temperature": 0.9, "seed": 1, "max_audio_ms": 30_000}
LONG = {**LONG_PCM, "stream_format": "sse"}


@dataclass
class Cluster:
    replicas: list[str]  # each replica's own address
    processes: list[Popen]
    lb: str  # nginx
    access_log: Path  # nginx's


def settings(f32_model: Path, voices: Path) -> dict[str, str]:
    return {"CSM_GGUF_MODEL": str(f32_model), "CSM_GGUF_KV_TYPE": "f32", "CSM_GGUF_VOICES": str(voices),
            "CSM_GGUF_THREADS": "1", "CSM_GGUF_MAX_STREAMS": "2", "CSM_GGUF_QUEUE": "4",
            "CSM_GGUF_MAX_WEBSOCKETS": str(MAX_WEBSOCKETS), "CSM_GGUF_WS_IDLE_S": str(IDLE_S)}


NO_NGINX = "nginx is not installed (apt-get install nginx; .ci/run installs it)"
needs_nginx = pytest.mark.skipif(shutil.which("nginx") is None, reason=NO_NGINX)


@pytest.fixture(scope="module")
def cluster(f32_model, tmp_path_factory):
    if shutil.which("nginx") is None:
        pytest.skip(NO_NGINX)
    tmp = tmp_path_factory.mktemp("replicas")
    voices = tmp / "voices"
    env = server_env(**settings(f32_model, voices))
    ports = [free_port(), free_port()]
    logs = [tmp / f"replica-{i}.log" for i in range(2)]
    processes = [start(gunicorn_command(port), env, log) for port, log in zip(ports, logs)]
    nginx = None
    try:
        replicas = [f"http://127.0.0.1:{port}" for port in ports]
        for base, process, log in zip(replicas, processes, logs):
            wait_ready(base, process, log)
        lb_port = free_port()
        nginx = start_nginx(tmp / "nginx", lb_port, [f"127.0.0.1:{port}" for port in ports])
        yield Cluster(replicas, processes, f"http://127.0.0.1:{lb_port}", tmp / "nginx" / "access.log")
    finally:
        if nginx is not None:
            stop(nginx)
        for process in processes:
            stop(process)


def speak(base: str, **fields) -> httpx.Response:
    return httpx.post(f"{base}/v1/audio/speech", json={**SHORT, **fields}, timeout=60)


def in_flight(cluster: Cluster) -> float:
    return sum(metric(scrape(r), "csm_gguf_requests_in_flight") for r in cluster.replicas)


def test_audio_streams_through_nginx_before_the_response_ends(cluster):
    started = time.monotonic()
    with httpx.stream("POST", f"{cluster.lb}/v1/audio/speech", json=LONG_PCM, timeout=60) as response:
        assert response.status_code == 200 and response.headers["transfer-encoding"] == "chunked"
        chunks = response.iter_raw()
        first = next(chunks)
        first_at = time.monotonic() - started
        assert first and in_flight(cluster) == 1  # its replica is still making the response
        rest = b"".join(chunks)
    total = time.monotonic() - started
    assert rest and first_at < 0.5 * total, (first_at, total)  # nginx passed audio on as it came


def noise_wav(seed: int) -> bytes:
    data = io.BytesIO()
    sf.write(data, np.random.default_rng(seed).uniform(-0.3, 0.3, 24_000).astype(np.float32), 24_000, format="WAV")
    return data.getvalue()


def same_audio(x: bytes, y: bytes) -> bool:
    """Greedy speech of two replicas: the same codes, decoded in the chunks they arrived in (which rounds
    a little differently: within one 16-bit step)."""
    a, b = np.frombuffer(x, "<i2").astype(int), np.frombuffer(y, "<i2").astype(int)
    return len(a) == len(b) > 0 and np.abs(a - b).max() <= 1


def save_voice(base: str, name: str, seed: int) -> httpx.Response:
    return httpx.post(f"{base}/v1/audio/voices", data={"name": name, "transcript": f"Voice sample {seed}."},
                      files={"audio_sample": ("v.wav", noise_wav(seed), "audio/wav")}, timeout=60)


def test_a_voice_saved_through_one_replica_speaks_through_the_other(cluster):
    a, b = cluster.replicas
    assert save_voice(a, "shared", seed=1).status_code == 200
    assert "shared" in [v["id"] for v in httpx.get(f"{b}/v1/audio/voices").json()["voices"]]
    first = speak(a, voice="shared")  # A has used it (whatever it keeps of it)
    assert first.status_code == 200 and same_audio(speak(b, voice="shared").content, first.content)
    assert httpx.delete(f"{b}/v1/audio/voices/shared").status_code == 200
    gone = speak(a, voice="shared")
    assert gone.status_code == 400 and "unknown voice 'shared'" in gone.json()["error"]["message"]
    assert save_voice(b, "shared", seed=2).status_code == 200  # the same name, another voice
    second = speak(a, voice="shared")
    assert second.status_code == 200 and same_audio(second.content, speak(b, voice="shared").content)
    assert not same_audio(second.content, first.content)
    assert httpx.delete(f"{a}/v1/audio/voices/shared").status_code == 200


def sse_usage(base: str) -> dict:
    response = speak(base, stream_format="sse")
    assert response.status_code == 200
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    return events[-1]["usage"]


def test_metrics_of_the_replicas_add_up_to_the_requests_sent(cluster):
    before = [scrape(r) for r in cluster.replicas]
    frames = sum(sse_usage(cluster.lb)["output_tokens"] for _ in range(4))
    assert httpx.get(f"{cluster.lb}/metrics").status_code == 404  # scraped per replica, not through nginx
    after = [scrape(r) for r in cluster.replicas]

    def added(name: str, **labels) -> list[float]:
        return [metric(y, name, **labels) - metric(x, name, **labels) for x, y in zip(before, after)]

    served = added("csm_gguf_requests_total", endpoint="/v1/audio/speech", status="200")
    assert sum(served) == 4 and min(served) > 0  # both replicas took some
    assert sum(added("csm_gguf_frames_total")) == frames > 0
    assert sum(added("csm_gguf_audio_seconds_total")) == pytest.approx(frames * 0.08)
    assert sum(added("csm_gguf_time_to_first_audio_seconds_count")) == 4
    assert sum(added("csm_gguf_request_real_time_factor_count")) == 4


def test_slow_and_idle_clients_do_not_stall_the_replicas(cluster):
    """Issue 21, item 2: under gunicorn alone, 32 unfinished headers, 40 trickled bodies or 32 idle
    websockets took every thread. Behind nginx, 200 of them together leave /health and speech answering
    within 2 s; websockets have a limit of their own, and idle ones are closed."""
    port = int(cluster.lb.rsplit(":", 1)[1])
    held: list[socket.socket] = []
    websockets = []
    try:
        for i in range(92):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
            held.append(sock)
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"in")  # 4 bytes of 100
            held.append(sock)
        ws_url = cluster.lb.replace("http", "ws") + "/v1/audio/speech/ws"
        websockets = [WsClient.connect(ws_url) for _ in range(2 * MAX_WEBSOCKETS)]  # every replica's every slot
        assert len(held) + len(websockets) == 200
        status, headers = upgrade_status(cluster.lb)
        assert status == 429 and headers["Retry-After"] == "1"
        for _ in range(3):
            started = time.monotonic()
            assert httpx.get(f"{cluster.lb}/health", timeout=5).status_code == 200
            assert speak(cluster.lb).status_code == 200
            assert time.monotonic() - started < 2
        for ws in websockets:
            code, reason = closed_with(ws, IDLE_S + 5)
            assert code == 1000 and "CSM_GGUF_WS_IDLE_S" in reason
        assert upgrade_status(cluster.lb)[0] == 101  # their slots are free again
    finally:
        for sock in held:
            sock.close()
        for ws in websockets:
            close_quietly(ws)


def slow_reader(base: str, body: dict) -> socket.socket:
    """A streaming request whose client reads nothing yet, with a small receive buffer: the server's
    writes block, so the request stays in flight until the client reads."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(60)
    sock.connect((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def read_all(sock: socket.socket) -> tuple[bytes, bytes]:
    """The response's head and de-chunked body, read to the end of the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower(), head
    body = b""
    while True:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            return head, body
        body, rest = body + rest[:n], rest[n + 2:]


def sse_audio(body: bytes) -> tuple[bytes, int]:
    """An SSE stream's audio and the frames its `done` event announced (which must end it)."""
    events = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done", events[-1]
    return b"".join(base64.b64decode(e["audio"]) for e in events[:-1]), events[-1]["usage"]["output_tokens"]


def assert_intact_sse(body: bytes, short_body: bytes) -> None:
    """All the speech an SSE stream announced in its `done` event (at a short one's bytes per frame)."""
    short, frames = sse_audio(short_body)
    audio, long_frames = sse_audio(body)
    assert long_frames > frames > 0 and len(audio) == long_frames * (len(short) // frames)




def test_nginx_logs_no_api_key_of_a_websocket_url(cluster):
    """The websocket may pass its key as `?api_key=` (browsers cannot set its headers): nginx's access log
    keeps the path, not the query."""
    before = len(cluster.access_log.read_text())  # earlier tests' lines
    ws = WsClient.connect(cluster.lb.replace("http", "ws") + "/v1/audio/speech/ws?api_key=sekrit-123")
    close_quietly(ws)
    deadline = time.monotonic() + 10
    while "/v1/audio/speech/ws" not in (log := cluster.access_log.read_text()[before:]):  # once it is closed
        assert time.monotonic() < deadline, log[-2000:]
        time.sleep(0.1)
    assert "sekrit" not in log and "api_key" not in log, log[-2000:]
    line = next(line for line in log.splitlines() if "/v1/audio/speech/ws" in line)
    assert '"GET /v1/audio/speech/ws HTTP/1.1" 101 ' in line, line


@needs_nginx
def test_upstream_servers_on_several_lines_make_a_configuration_nginx_accepts(tmp_path):
    """CSM_UPSTREAM_SERVERS as a YAML block, one `server` a line: envsubst fills in the template's
    comments too, so no variable may appear in them."""
    servers = "server 127.0.0.1:8101;\n    server 127.0.0.1:8102;\n"
    site = nginx_site(free_port(), servers)
    conf = nginx_conf(tmp_path, site)
    checked = subprocess.run(["nginx", "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert site.count("server 127.0.0.1:8102;") == 1  # in the upstream block only


def raw_response(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and body (by its Content-Length) of one request sent raw."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        while len(body) < int(headers["content-length"]):
            body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def assert_openai_error(headers: dict[str, str], body: bytes, type: str, code: str) -> str:
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] is None
    assert (error["type"], error["code"]) == (type, code) and error["message"]
    return error["message"]


@needs_nginx
def test_what_nginx_answers_itself_is_json_in_openai_shape(tmp_path):
    """No replica answering is a 503 with Retry-After (clients retry it), not nginx's HTML 502; a body
    over nginx's limit a 413; and nginx does not say its version."""
    port = free_port()
    nginx = start_nginx(tmp_path, port, [f"127.0.0.1:{free_port()}"])  # where nothing listens
    try:
        base = f"http://127.0.0.1:{port}"
        for response in (speak(base), httpx.get(f"{base}/v1/models", timeout=10)):
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert response.headers["server"] == "nginx"
            assert_openai_error(response.headers, response.content, "server_error", "unavailable")
        status, headers, body = raw_response(port, b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\n"
                                             b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                                             % (64 * 2**20 + 1))
        assert status == 413 and headers["server"] == "nginx"
        assert "64 MiB" in assert_openai_error(headers, body, "invalid_request_error", "request_entity_too_large")
    finally:
        stop(nginx)


def wait_status(url: str, status: int, within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while httpx.get(url, timeout=2).status_code != status:
        assert time.monotonic() < deadline, f"{url} did not answer {status} within {within} s"
        time.sleep(0.05)


def test_sigterm_drains_a_replica_while_nginx_serves_from_the_other(cluster):
    """(Last of the cluster's tests: replica A is gone after it.)"""
    a, process = cluster.replicas[0], cluster.processes[0]
    sock = slow_reader(a, LONG)
    time.sleep(0.5)  # speaking, its writes blocked
    process.send_signal(signal.SIGTERM)
    wait_status(f"{a}/health/ready", 503)
    refused = speak(a)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    through_nginx = [speak(cluster.lb).status_code for _ in range(4)]
    through_nginx += [httpx.get(f"{cluster.lb}{path}", timeout=10).status_code
                      for path in ("/v1/models", "/health", "/v1/audio/voices", "/health/ready")]
    assert through_nginx == [200] * 8  # A's 503s went on to B
    assert process.poll() is None  # still draining: its stream is in flight
    assert_intact_sse(read_all(sock)[1], speak(cluster.replicas[1], stream_format="sse").content)
    assert process.wait(timeout=30) == 0
    assert [speak(cluster.lb).status_code for _ in range(3)] == [200] * 3


def test_sigterm_under_flask_run_drains_and_exits_0(f32_model, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = server_env(**settings(f32_model, tmp_path / "voices"))
    log = tmp_path / "flask.log"
    process = start([sys.executable, "-m", "flask", "--app", "csm_gguf.web", "run", "--port", str(port)], env, log)
    try:
        wait_ready(base, process, log)
        short = speak(base, stream_format="sse").content
        sock = slow_reader(base, LONG)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        wait_status(f"{base}/health/ready", 503)
        assert httpx.get(f"{base}/v1/models").status_code == 503
        assert process.poll() is None
        assert_intact_sse(read_all(sock)[1], short)
        assert process.wait(timeout=30) == 0, log.read_text()[-3000:]
        # The server's own lines, timed and leveled (Python's default dropped the INFO ones, printed the rest bare).
        said = log.read_text()
        stamp = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[\d+\] \[INFO\] csm_gguf\.server"
        for line in (": serving .* 2 streams, a queue of 4", r"\.drain: SIGTERM: draining", r"\.drain: drained"):
            assert re.search(stamp + line, said), said[-3000:]
    finally:
        stop(process)


def test_a_request_refused_before_its_body_is_read_leaves_its_connection_usable(f32_model, tmp_path):
    """Under gunicorn, as the images run it: a 401 (or a full queue's 429, the drain's 503) answered before a
    300 KB body was read kept the connection "alive", and gunicorn, which drains 64 KiB at most, then closed
    it: the client's next request on it failed ("Server disconnected without sending a response")."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = server_env(**settings(f32_model, tmp_path / "voices"), CSM_GGUF_API_KEY="secret")
    log = tmp_path / "gunicorn.log"
    process = start(gunicorn_command(port), env, log)
    try:
        wait_ready(base, process, log)
        with httpx.Client(base_url=base, timeout=30) as client:  # one connection, kept alive
            for _ in range(3):
                refused = client.post("/v1/audio/speech", json={**SHORT, "pad": "x" * 300_000},
                                      headers={"Authorization": "Bearer wrong"})
                assert refused.status_code == 401
                assert client.get("/health").status_code == 200  # on the same connection
    finally:
        stop(process)
