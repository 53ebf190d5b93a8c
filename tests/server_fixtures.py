"""The speech server on loopback, for tests outside test_web.py: create_app + werkzeug's threaded server."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator

from werkzeug.serving import make_server

import csm_gguf

# The server's modules are moving into a package; tests import its engine's names from here. Decided by the
# files of the csm_gguf imported (an editable install could supply a module this checkout does not have).
if os.path.exists(os.path.join(csm_gguf.__path__[0], "server", "engine.py")):
    from csm_gguf.server.engine import SpeechJob  # noqa: F401
else:
    from csm_gguf.server_engine import SpeechJob  # noqa: F401


@contextmanager
def loopback_server(model_dir, voices_dir, **settings) -> Iterator[tuple[object, str]]:
    """(the app's engine, its base URL) while the server runs; voices are saved in `voices_dir`."""
    from csm_gguf.web import create_app

    old = os.environ.get("CSM_GGUF_VOICES")
    os.environ["CSM_GGUF_VOICES"] = str(voices_dir)
    app = create_app(model=str(model_dir), kv_type="f32", **settings)
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield app.extensions["csm"], f"http://127.0.0.1:{srv.server_port}"
    finally:
        srv.shutdown()
        app.extensions["csm"].close()
        if old is None:
            del os.environ["CSM_GGUF_VOICES"]
        else:
            os.environ["CSM_GGUF_VOICES"] = old
