"""Every example runs against the tiny model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script: str, *args: str, cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, input=stdin,
                          capture_output=True, timeout=300, check=True)


def test_simple(f32_model, tmp_path):
    run("simple.py", "--model", str(f32_model), "--max-audio-ms", "800", cwd=tmp_path)
    assert sf.info(tmp_path / "hello.wav").frames > 0


def test_voice_prompt(f32_model, tmp_path):
    sf.write(tmp_path / "ref.wav", 0.2 * np.sin(np.linspace(0, 300, 12000)), 24000)
    run("voice_prompt.py", "ref.wav", "A reference.", "--model", str(f32_model), "--max-audio-ms", "800",
        cwd=tmp_path)
    assert sf.info(tmp_path / "cloned.wav").frames > 0


def test_streaming(f32_model, tmp_path):
    out = run("streaming.py", "--model", str(f32_model), "--max-audio-ms", "800", cwd=tmp_path)
    assert len(out.stdout) > 0 and b"first audio after" in out.stderr


def test_dialogue(f32_model, tmp_path):
    sf.write(tmp_path / "a.wav", 0.2 * np.sin(np.linspace(0, 300, 12000)), 24000)
    run("dialogue.py", "--voice-0", "a.wav", "A reference.", "--model", str(f32_model), "--max-audio-ms", "400",
        cwd=tmp_path)
    assert sf.info(tmp_path / "dialogue.wav").frames > 0


def test_speak_as_it_comes(f32_model, tmp_path):
    out = run("speak_as_it_comes.py", "--model", str(f32_model), "--max-audio-ms", "400", cwd=tmp_path,
              stdin="First sentence. Second one, café.".encode())
    assert len(out.stdout) > 0 and len(out.stdout) % 2 == 0


def test_server_client(f32_model, tmp_path, monkeypatch):
    import threading

    from werkzeug.serving import make_server

    from csm_gguf.web import create_app

    monkeypatch.setenv("CSM_GGUF_VOICES", str(tmp_path / "voices"))
    app = create_app(model=str(f32_model), kv_type="f32")
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        sf.write(tmp_path / "ref.wav", 0.2 * np.sin(np.linspace(0, 300, 12000)), 24000)
        run("server_client.py", "ref.wav", "A reference.", "--base-url", f"http://127.0.0.1:{server.server_port}/v1",
            "--max-audio-ms", "400", cwd=tmp_path)
    finally:
        server.shutdown()
        app.extensions["csm_gguf"].engine.close()
    assert sf.info(tmp_path / "out.mp3").frames > 0
    assert not list((tmp_path / "voices").iterdir())  # deleted again
