"""`qlnas dashboard DIR`: optuna-dashboard over a search's study, bound to localhost."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from qlnas.errors import UserError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="optuna-dashboard over the Optuna study of a search")
    from qlnas.search.tb import add_server_arguments

    p.add_argument("dir", help="a search folder (--out of qlnas search)")
    add_server_arguments(p, port=8080)
    p.set_defaults(func=run)


def open_study(folder: str | Path):
    """The study of the search in `folder`, read from the storage its study.json names."""
    from qlnas.search.study import STUDY_JSON, study_ref

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (expected the --out folder of a search)")
    ref = study_ref(folder)
    path = None  # a file the storage must already be (opening it would create an empty one)
    if ref.is_journal:
        path = ref.storage
    elif ref.storage.startswith("sqlite:///"):
        path = ref.storage[len("sqlite:///"):]
    if path is not None and not Path(path).is_file():
        raise UserError(f"{folder / STUDY_JSON}: storage {ref.storage}: no such file")
    return ref, ref.load()


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # the page fetches in parallel; Ctrl-C does not wait for them


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # requests: debug, not stderr
        log.debug("%s " + format, self.address_string(), *args)


def run(args: argparse.Namespace) -> int:
    from wsgiref.simple_server import make_server

    import optuna_dashboard

    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: expected 1-65535")
    ref, study = open_study(args.dir)
    storage = ref.open_storage()
    app = optuna_dashboard.wsgi(storage)
    try:
        server = make_server(args.host, args.port, app, server_class=_Server,
                             handler_class=_Handler)
    except OSError as exc:
        raise UserError(f"--host {args.host} --port {args.port}: cannot listen there "
                        f"({exc.strerror or exc})") from None
    trials = len(study.get_trials(deepcopy=False))
    page = f"http://{args.host}:{args.port}/dashboard/studies/" \
           f"{storage.get_study_id_from_name(ref.name)}"
    print(f"optuna-dashboard over study {ref.name!r} in {ref.storage} ({trials} trials so far; "
          "new ones appear as the search runs)")
    print(f"open {page}  (from another machine: "
          f"ssh -L {args.port}:localhost:{args.port} <this host>)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # the way to stop a server: not an error
        pass
    finally:
        server.server_close()
    return 0
