"""A local stand-in for a PCCS: serves one collateral JSON (as dcap-qvl writes it) over the PCCS
v4 endpoints dcap-qvl's ``get_collateral`` asks for (Phala-Network/dcap-qvl src/collateral.rs
``PcsEndpoints``: pckcrl, tcb, qe/identity, rootcacrl), so fetching collateral is tested offline."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def serve(collateral: Path) -> Iterator[tuple[str, list[str]]]:
    """Yields the base URL and the list of paths asked for."""
    document = json.loads(collateral.read_text())
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            path = urllib.parse.urlparse(self.path).path
            asked.append(path)
            headers, body = {}, b""
            if path.endswith("/pckcrl"):
                headers["SGX-PCK-CRL-Issuer-Chain"] = urllib.parse.quote(document["pck_crl_issuer_chain"])
                body = bytes.fromhex(document["pck_crl"])
            elif path.endswith("/rootcacrl"):
                body = document["root_ca_crl"].encode()  # a PCCS answers with hex
            # The bodies embed Intel's signed JSON verbatim: re-serialising it would break its signature.
            elif path.endswith("/tcb"):
                headers["TCB-Info-Issuer-Chain"] = urllib.parse.quote(document["tcb_info_issuer_chain"])
                body = ('{"tcbInfo":' + document["tcb_info"] + ',"signature":"'
                        + document["tcb_info_signature"] + '"}').encode()
            elif path.endswith("/qe/identity"):
                headers["SGX-Enclave-Identity-Issuer-Chain"] = urllib.parse.quote(document["qe_identity_issuer_chain"])
                body = ('{"enclaveIdentity":' + document["qe_identity"] + ',"signature":"'
                        + document["qe_identity_signature"] + '"}').encode()
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
