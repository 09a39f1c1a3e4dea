"""``make serve PORT=N``: the real ComfyUI server on 127.0.0.1:N (CPU) with this pack mounted."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import host  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=8188)
    ap.add_argument("--base", type=Path, default=host.ROOT / ".host" / "base",
                    help="ComfyUI base directory (models/, custom_nodes/, output/)")
    ap.add_argument("--no-tiny-models", action="store_true",
                    help="do not mount the tiny random-weight test models")
    a = ap.parse_args()
    host.prepare_base(a.base, with_tiny_models=not a.no_tiny_models)
    print(f"ComfyUI on http://127.0.0.1:{a.port}  (base directory {a.base})", flush=True)
    # Ctrl-C, SIGTERM, SIGHUP or an error here stop the server too; so does the kernel if this process dies.
    process = host.spawn_server(host.server_command(a.port, a.base), cwd=host.COMFY_DIR)
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        host.terminate(process)


if __name__ == "__main__":
    sys.exit(main())
