# `ramster bench node --tls` and `ramster bench cluster --tls`: what TLS costs, measured as the
# same benchmark run twice in one process, first against plaintext, then with TLS (for a
# node: TLS and a bearer token for the client; for a cluster: TLS for the client and mTLS and
# sealed pages between the nodes), on fresh nodes each time so neither
# run inherits the other's warm pools.  The result holds both runs and, for each throughput
# figure, TLS divided by plaintext (1.0: free; the goal is >= 0.8).  Runs in sequence on the
# same machine, so background noise is shared, not cancelled: on a shared 2-core machine one
# pair's get ratio was seen anywhere from 0.53 to 1.34 (while the node's CPU per page differed
# by under 10%), so `repeat` runs that many pairs back to back and reports the median ratio.
from __future__ import annotations

import secrets
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ramster.certs import make_bundle
from ramster.client.local import LocalNode

NODE_RATES = ("put_pages_per_s", "get_pages_per_s")
CLUSTER_RATES = ("put_pages_per_s", "local_get_pages_per_s", "remote_get_pages_per_s")


def compare(
    measure: Callable[[bool], dict[str, Any]], rates: Sequence[str], repeat: int = 1
) -> dict[str, Any]:
    """measure(tls=False), then measure(tls=True), `repeat` times; per rate, the median of the
    pairs' TLS/plaintext ratios (with `repeat` > 1 each pair's ratio too, under
    tls_vs_plaintext_RATE_runs).  "plaintext" and "tls" hold the first pair's results."""
    pairs = [(measure(False), measure(True)) for _ in range(repeat)]
    ratios = {r: [round(secured[r] / plain[r], 3) for plain, secured in pairs] for r in rates}
    runs = {f"tls_vs_plaintext_{r}_runs": v for r, v in ratios.items()} if repeat > 1 else {}
    return {
        **{f"tls_vs_plaintext_{r}": statistics.median(v) for r, v in ratios.items()},
        **runs,
        "verified": all(plain["verified"] and secured["verified"] for plain, secured in pairs),
        "plaintext": pairs[0][0],
        "tls": pairs[0][1],
    }


def node_run(run: Callable[..., dict[str, Any]], tls: bool) -> dict[str, Any]:
    """run(target=..., tls=...) against a fresh local node, serving TLS if `tls`."""
    if not tls:
        with LocalNode() as node:
            return run(target=node.target, tls={})
    with tempfile.TemporaryDirectory(prefix="ramster-bench-certs-") as tmp:
        bundle = make_bundle(Path(tmp), ["bench"])
        cert, key = bundle.nodes["bench"]
        token = secrets.token_urlsafe(32)
        tokens = Path(tmp) / "tokens.toml"
        tokens.write_text(f'[tenants.bench]\ntokens = ["{token}"]\n')
        flags = ["--node-id", "bench", "--tls-cert", str(cert), "--tls-key", str(key)]
        flags += ["--tls-ca", str(bundle.ca), "--tokens", str(tokens)]
        with LocalNode(*flags, tls_ca=bundle.ca, token=token) as node:
            return run(target=node.target, tls={"tls_ca": bundle.ca}, token=token)
