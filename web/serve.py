"""
Serve IRIS's web page and one export folder on this machine, with the headers that let
ONNX Runtime Web use threads. The browser does all the work; this only hands out files.

    npm ci --prefix web                                   # once: onnxruntime-web and tokenizers.js
    python web/serve.py out-shapes-flow/mobile-fp32       # then open the address it prints
    python web/serve.py out-shapes-flow/mobile-fp32 0     # on any free port

The page is web/ at / and the export folder at /export/. A static host needs the same files
(README.md, "In the browser") and, for threads, the same two headers.
"""
import functools
import http.server
import json
import os
import sys

WEB = os.path.dirname(os.path.abspath(__file__))
LIBRARIES = ('onnxruntime-web/dist/ort.wasm.min.mjs', '@huggingface/tokenizers/dist/tokenizers.min.mjs')


class Handler(http.server.SimpleHTTPRequestHandler):
    """web/ at /, the export folder at /export/; cross-origin isolated, so WASM may use threads."""
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      '.mjs': 'text/javascript', '.js': 'text/javascript', '.wasm': 'application/wasm'}

    def __init__(self, *args, export_dir, **kwargs):
        self.export_dir = export_dir
        super().__init__(*args, directory=WEB, **kwargs)

    def translate_path(self, path):
        path = path.split('?', 1)[0].split('#', 1)[0]
        if path.startswith('/export/'):
            inside = super().translate_path('/' + path[len('/export/'):])  # resolved under web/, then moved
            return os.path.join(self.export_dir, os.path.relpath(inside, WEB))
        return super().translate_path(path)

    def end_headers(self):
        self.send_header('Cross-Origin-Opener-Policy', 'same-origin')
        self.send_header('Cross-Origin-Embedder-Policy', 'require-corp')
        self.send_header('Cache-Control', 'no-cache')  # a re-export is picked up on reload
        super().end_headers()

    def log_request(self, code='-', size='-'):  # quiet but for failures, which log_error reports
        pass


def main(argv):
    if len(argv) not in (1, 2) or (len(argv) == 2 and not argv[1].isdigit()):
        raise SystemExit("usage: python web/serve.py EXPORT_DIR [PORT]  (EXPORT_DIR: a folder export_mobile.py wrote)")
    export_dir, port = os.path.abspath(argv[0]), int(argv[1]) if len(argv) == 2 else 8000
    if not os.path.isfile(os.path.join(export_dir, 'mobile.json')):
        raise SystemExit(f"error: {argv[0]} has no mobile.json; export a run first: "
                         f"python export_mobile.py --out_dir=<run> (it writes <run>/mobile-fp32)")
    with open(os.path.join(export_dir, 'mobile.json')) as f:
        if not json.load(f).get('onnx'):
            raise SystemExit(f"error: {argv[0]} holds no ONNX files, which the page runs; "
                             f"export in fp32 or int8 with onnx=True")
    missing = [lib for lib in LIBRARIES if not os.path.isfile(os.path.join(WEB, 'node_modules', lib))]
    if missing:
        raise SystemExit(f"error: web/node_modules lacks {missing[0]}; "
                         f"install the page's libraries: npm ci --prefix web")
    try:
        server = http.server.ThreadingHTTPServer(('127.0.0.1', port),
                                                 functools.partial(Handler, export_dir=export_dir))
    except OSError as e:
        raise SystemExit(f"error: cannot serve on port {port} ({e.strerror}); pick another with --port=N") from None
    print(f"serving {argv[0]} at http://127.0.0.1:{server.server_port}/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == '__main__':
    main(sys.argv[1:])
