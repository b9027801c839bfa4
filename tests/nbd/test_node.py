# NBD as part of a node process: flags, the loopback-only rule, metrics, a restart on the same
# data directory, and a 3-node cluster whose export outgrows node 1's pool.
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.settings import HostPort, Settings
from node.tls import check_protected, load_tls
from ramster.bench.cluster import metric_samples, metric_value
from ramster.client.cluster import LocalCluster
from ramster.client.local import LocalNode
from tests.nbd.conftest import Certs, MiB, eventually, nbd_node, need, node_exits, run
from tests.nbd.test_clients import NBDSH, need_libnbd
from tests.smalldisk import ROOT, fill_up, small_disk


def nbd_port(node: LocalNode) -> int:
    """The NBD port a node logged (the last start's, after a restart)."""
    lines = [json.loads(line) for line in node.log().splitlines() if '"nbd_listening"' in line]
    return int(lines[-1]["port"])


def copy_in_and_out(uri: str, data: bytes, tmp_path: Path) -> bytes:
    src, dst = tmp_path / "in.img", tmp_path / "out.img"
    src.write_bytes(data)
    run("nbdcopy", str(src), uri)
    run("nbdcopy", uri, str(dst))
    return dst.read_bytes()[: len(data)]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--nbd-listen", "0.0.0.0:0", "--nbd-export", "a:1Mi"], "loopback addresses only"),
        (["--nbd-listen", "192.0.2.1:10809", "--nbd-export", "a:1Mi"], "unless --insecure"),
        (["--nbd-export", "a:1Mi"], "--nbd-export needs --nbd-listen"),
        (["--nbd-listen", "127.0.0.1:0"], "needs at least one --nbd-export"),
    ],
)
def test_nbd_settings_that_cannot_work_stop_the_node(
    args: list[str], error: str, tmp_path: Path
) -> None:
    done = node_exits(tmp_path, *args)
    assert done.returncode == 1
    assert '"event": "startup_failed"' in done.stderr and error in done.stderr


def test_protected_mode_takes_a_reachable_nbd_port_with_tls_and_client_auth(
    certs: Certs,
) -> None:
    reachable = HostPort("192.0.2.1", 10809)  # checked only: nothing listens there
    with_auth = replace(certs.node, nbd_listen=reachable, tls_client_auth=True)
    check_protected(with_auth, load_tls(with_auth), False, None)
    for settings, error in (
        (replace(with_auth, tls_client_auth=False), "without --tls-client-auth"),
        (Settings(nbd_listen=reachable), "without TLS, NBD is served on loopback"),
    ):
        with pytest.raises(ValueError, match=error):
            check_protected(settings, load_tls(settings), False, None)


def test_a_node_with_tls_serves_nbd_over_tls_only(certs: Certs, tmp_path: Path) -> None:
    need("nbdcopy", "nbdinfo")
    s = certs.node
    assert s.tls_cert and s.tls_key and s.tls_ca
    tls = ("--node-id", "n1", "--tls-cert", str(s.tls_cert), "--tls-key", str(s.tls_key))
    with nbd_node(*tls, "--tls-ca", str(s.tls_ca), "--nbd-export", "disk:8Mi") as node:
        port = nbd_port(node)
        uri = f"nbds://127.0.0.1:{port}/disk?tls-certificates={certs.client_dir}"
        data = os.urandom(3 * MiB)
        assert copy_in_and_out(uri, data, tmp_path) == data
        plain = subprocess.run(
            ["nbdinfo", f"nbd://127.0.0.1:{port}/disk"], capture_output=True, timeout=60
        )
        assert plain.returncode != 0
        assert node.running


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("nosize", "expected NAME:SIZE"),
        ("x" * 300 + ":4Mi", "expected NAME:SIZE (a name of 1 to 256 bytes), got 'xxxx"),
        ("odd:4097", "the size of export 'odd' must be a multiple of 4096"),
        ("none:0", "export 'none': a size must be at least one page (4096 bytes)"),
        ("huge:8388608Ti", "the size of export 'huge' must be at most 9223372036854771712"),
        ("x:1Mi,x:2Mi", "two NBD exports have the same name"),
    ],
)
def test_bad_export_flags_are_usage_errors(tmp_path: Path, value: str, says: str) -> None:
    env = {**os.environ, "RAMSTER_NBD_EXPORT": value}
    done = subprocess.run(
        [sys.executable, "-m", "node", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 2 and "RAMSTER_NBD_EXPORT" in done.stderr
    assert says in done.stderr and len(done.stderr) < 500, done.stderr


def test_node_serves_exports_and_counts_them(tmp_path: Path) -> None:
    need("nbdcopy", "nbdinfo")
    with nbd_node("--nbd-export", "swap:64Mi", "--nbd-export", "disk:8Mi") as node:
        port = nbd_port(node)
        listed = json.loads(run("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{port}"))
        sizes = {e["export-name"]: e["export-size"] for e in listed["exports"]}
        assert sizes == {"swap": 64 * MiB, "disk": 8 * MiB}
        data = os.urandom(4 * MiB) + bytes(4 * MiB)
        assert copy_in_and_out(f"nbd://127.0.0.1:{port}/disk", data, tmp_path) == data
        url = f"http://127.0.0.1:{node.metrics_port}/metrics"
        metrics = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    disk = ("export", "disk")
    assert samples["ramster_nbd_bytes_total", (("direction", "written"), disk)] == 4 * MiB
    # nbdcopy asks base:allocation first and reads only the data: the zero half is a hole
    assert samples["ramster_nbd_bytes_total", (("direction", "read"), disk)] == 4 * MiB
    assert samples[
        "ramster_nbd_requests_total", (("command", "block_status"), disk, ("result", "ok"))
    ]
    assert samples["ramster_nbd_requests_total", (("command", "write"), disk, ("result", "ok"))]
    assert samples["ramster_nbd_request_seconds_count", (("command", "read"), disk)]
    assert samples["ramster_nbd_connections", ()] == 0


def test_an_export_keeps_its_data_across_a_graceful_restart(tmp_path: Path) -> None:
    need("nbdcopy", "nbdinfo")
    data_dir, data = tmp_path / "data", os.urandom(2 * MiB) + b"page" * (512 * 1024)
    args = ("--pool-limit", "4Mi", "--nbd-export", "disk:16Mi")
    with nbd_node(*args, data_dir=data_dir) as node:
        uri = f"nbd://127.0.0.1:{nbd_port(node)}/disk"
        assert copy_in_and_out(uri, data, tmp_path) == data
        assert node.stop() == 0
    with nbd_node(*args, data_dir=data_dir) as node:
        uri = f"nbd://127.0.0.1:{nbd_port(node)}/disk"
        # the map holds what was written: here all of it is on disk, read back at the start
        mapped = json.loads(run("nbdinfo", "--map", "--json", uri))
        assert [(e["offset"], e["length"], e["type"]) for e in mapped] == [
            (0, len(data), 0),
            (len(data), 16 * MiB - len(data), 3),
        ]
        back = tmp_path / "back.img"
        run("nbdcopy", uri, str(back))
        assert back.read_bytes()[: len(data)] == data


def test_an_export_shrinks_only_once_the_data_past_its_new_end_is_discarded(
    tmp_path: Path,
) -> None:
    """Declared smaller than its data, an export would hide the tail yet keep it, and show it
    again once grown back: the node refuses to start until the tail is discarded."""
    need("nbdcopy", "qemu-io")
    data_dir = tmp_path / "data"
    data = os.urandom(5 * MiB) + bytes(MiB) + os.urandom(MiB) + bytes(MiB)  # data up to 7 MiB
    with nbd_node("--nbd-export", "disk:8Mi", data_dir=data_dir) as node:
        assert copy_in_and_out(f"nbd://127.0.0.1:{nbd_port(node)}/disk", data, tmp_path) == data
        assert node.stop() == 0
    for size in ("4Mi", "6Mi", "7164Ki"):  # to one block short of the end of the data
        done = node_exits(data_dir, "--nbd-listen", "127.0.0.1:0", "--nbd-export", f"disk:{size}")
        assert done.returncode == 1 and '"event": "startup_failed"' in done.stderr
        assert f"export 'disk' is declared {size} but holds data up to 7Mi" in done.stderr
        assert "declare it at least disk:7Mi" in done.stderr
    with nbd_node("--nbd-export", "disk:7Mi", data_dir=data_dir) as node:  # down to the data
        uri = f"nbd://127.0.0.1:{nbd_port(node)}/disk"
        run("qemu-io", "-f", "raw", "-c", f"discard {4 * MiB} {3 * MiB}", uri)
        assert node.stop() == 0
    with nbd_node("--nbd-export", "disk:4Mi", data_dir=data_dir) as node:
        assert node.stop() == 0
    with nbd_node("--nbd-export", "disk:8Mi", data_dir=data_dir) as node:  # grown back
        back = tmp_path / "back.img"
        run("nbdcopy", f"nbd://127.0.0.1:{nbd_port(node)}/disk", str(back))
        assert back.read_bytes() == data[: 4 * MiB] + bytes(4 * MiB)
        assert node.stop() == 0
    with nbd_node("--nbd-export", "other:1Mi", data_dir=data_dir) as node:  # "disk" undeclared
        assert node.stop() == 0
        (warned,) = [line for line in node.log().splitlines() if "nbd_export_undeclared" in line]
    assert json.loads(warned)["export"] == "disk" and json.loads(warned)["pages"] == 1024


ZEROS_SCRIPT = """
import nbd
h = nbd.NBD()
h.connect_uri(URI)
h.pwrite(open(DATA, "rb").read(), 0)  # blocks 0..63: data
h.pwrite(bytes(64 * 4096), 64 * 4096)  # blocks 64..127: zeros, written as data
h.pwrite(bytes(16 * 4096), 0)  # blocks 0..15: data overwritten with zeros
h.shutdown()
"""


def logged(node: LocalNode, event: str) -> dict[str, object]:
    """The fields of the last `event` a node logged."""
    lines = [line for line in node.log().splitlines() if f'"event": "{event}"' in line]
    return dict(json.loads(lines[-1]))


def test_blocks_written_as_zeros_are_holes_before_and_after_a_restart(tmp_path: Path) -> None:
    """A WRITE of zero pages keeps nothing: the blocks map as holes, a graceful stop writes
    none of them to disk, and the export still shrinks to its last block of data."""
    need("nbdinfo", "nbdcopy")
    need_libnbd()
    data_dir, data = tmp_path / "data", os.urandom(64 * 4096)
    want = bytes(16 * 4096) + data[16 * 4096 :] + bytes(64 * 4096)
    expected_map = [(0, 16 * 4096, 3), (16 * 4096, 48 * 4096, 0), (64 * 4096, 960 * 4096, 3)]
    with nbd_node("--nbd-export", "disk:4Mi", data_dir=data_dir) as node:
        uri = f"nbd://127.0.0.1:{nbd_port(node)}/disk"
        (tmp_path / "data.img").write_bytes(data)
        script = f"URI = {uri!r}\nDATA = {str(tmp_path / 'data.img')!r}\n" + ZEROS_SCRIPT
        run(*NBDSH, "-c", script)
        for restarted in (False, True):
            uri = f"nbd://127.0.0.1:{nbd_port(node)}/disk"
            mapped = json.loads(run("nbdinfo", "--map", "--json", uri))
            assert [(e["offset"], e["length"], e["type"]) for e in mapped] == expected_map
            run("nbdcopy", uri, str(tmp_path / "back.img"))
            assert (tmp_path / "back.img").read_bytes()[: len(want)] == want
            if not restarted:
                node = restart_with(node, "--nbd-export", "disk:4Mi")
                assert logged(node, "written_back")["pages"] == 48
        assert logged(node, "listening")["pages_recovered"] == 48
        assert node.stop() == 0
    with nbd_node("--nbd-export", "disk:256Ki", data_dir=data_dir) as node:  # the data's end
        back = tmp_path / "short.img"
        run("nbdcopy", f"nbd://127.0.0.1:{nbd_port(node)}/disk", str(back))
        assert back.read_bytes() == want[: 256 * 1024]
        assert node.stop() == 0


READ_BLOCKS_SCRIPT = """
import json, nbd
h = nbd.NBD()
h.connect_uri(URI)
failed = {}
with open(OUT, "wb") as out:
    for block in range(BLOCKS):
        try:
            out.write(h.pread(4096, block * 4096))
        except nbd.Error as exc:
            failed[block] = exc.errno  # its name: EIO
            out.write(bytes(4096))
print(json.dumps(failed))
"""

REPAIR_SCRIPT = """
import nbd
h = nbd.NBD()
h.connect_uri(URI)
written, trimmed, zeroed = LOST
h.pwrite(b"new!" * 1024, written * 4096)
h.trim(4096, trimmed * 4096)
h.zero(4096, zeroed * 4096)
h.shutdown()
"""


def read_blocks(uri: str, blocks: int, tmp_path: Path) -> tuple[dict[int, str], bytes]:
    """Each block of an export read on its own: the blocks that failed (their errno names)
    and what was read (zeros for those)."""
    out = tmp_path / "blocks.img"
    script = f"URI = {uri!r}\nOUT = {str(out)!r}\nBLOCKS = {blocks}\n" + READ_BLOCKS_SCRIPT
    failed = json.loads(run(*NBDSH, "-c", script))
    return {int(b): e for b, e in failed.items()}, out.read_bytes()


def test_blocks_a_crash_lost_read_as_io_errors_not_zeros_until_written_again(
    tmp_path: Path,
) -> None:
    """A node SIGKILLed loses the pages its RAM alone held; their blocks read as EIO after the
    restart (the export's block map says they hold data), never as the zeros of a block never
    written, and copy tools see them as data; the pages that were on disk read back as written.
    A block written, trimmed or zeroed again is whole again, across a graceful restart too.
    (They read as zeros, and nbdcopy copied the export without an error.)"""
    need("nbdcopy", "nbdinfo")
    need_libnbd()
    data_dir, data = tmp_path / "data", os.urandom(8 * MiB)  # raw pages: half go to disk
    blocks = len(data) // 4096
    with nbd_node("--pool-limit", "4Mi", "--nbd-export", "disk:16Mi", data_dir=data_dir) as node:
        (tmp_path / "in.img").write_bytes(data)
        run("nbdcopy", str(tmp_path / "in.img"), f"nbd://127.0.0.1:{nbd_port(node)}/disk")
        node.kill()
        node.start()
        uri = f"nbd://127.0.0.1:{nbd_port(node)}/disk"
        lost = logged(node, "nbd_blocks_lost")["blocks"]
        assert isinstance(lost, int) and 0 < lost < blocks
        assert metric_value(node, "ramster_nbd_lost_blocks_total") == lost
        assert "persistent_pages_may_be_lost" not in node.log()  # an export counts its own
        failed, back = read_blocks(uri, 2 * blocks, tmp_path)
        assert len(failed) == lost and set(failed.values()) == {"EIO"}
        assert max(failed) < blocks  # never-written blocks read as zeros
        for block in range(blocks):
            if block not in failed:
                assert (
                    back[block * 4096 : (block + 1) * 4096]
                    == data[block * 4096 : (block + 1) * 4096]
                )
        assert back[len(data) :] == bytes(len(data))
        mapped = json.loads(run("nbdinfo", "--map", "--json", uri))
        assert [(e["offset"], e["length"], e["type"]) for e in mapped] == [
            (0, len(data), 0),  # the lost blocks too: data that fails to read, not holes
            (len(data), 16 * MiB - len(data), 3),
        ]
        done = subprocess.run(["nbdcopy", uri, str(tmp_path / "copy.img")], capture_output=True)
        assert done.returncode and b"Input/output error" in done.stderr

        repaired = sorted(failed)[:3]
        script = f"URI = {uri!r}\nLOST = {repaired!r}\n" + REPAIR_SCRIPT
        run(*NBDSH, "-c", script)
        node = restart_with(node, "--nbd-export", "disk:16Mi")
        assert logged(node, "nbd_blocks_lost")["blocks"] == lost - 3
        failed_now, back = read_blocks(f"nbd://127.0.0.1:{nbd_port(node)}/disk", blocks, tmp_path)
        assert set(failed_now) == set(failed) - set(repaired)
        written, trimmed, zeroed = (back[b * 4096 : (b + 1) * 4096] for b in repaired)
        assert (written, trimmed, zeroed) == (b"new!" * 1024, bytes(4096), bytes(4096))
        assert node.stop() == 0


def test_data_past_the_first_4_gib_keeps_an_export_from_shrinking_too(tmp_path: Path) -> None:
    need("qemu-io")
    data_dir = tmp_path / "data"
    with nbd_node("--nbd-export", "big:6Gi", data_dir=data_dir) as node:  # two index objects
        uri = f"nbd://127.0.0.1:{nbd_port(node)}/big"
        run("qemu-io", "-f", "raw", "-c", "write -P 7 0 4k", "-c", f"write -P 9 {4 << 30} 4k", uri)
        assert node.stop() == 0
    done = node_exits(data_dir, "--nbd-listen", "127.0.0.1:0", "--nbd-export", "big:4Gi")
    assert "export 'big' is declared 4Gi but holds data up to 4194308Ki" in done.stderr


def foreign_pages(cluster: LocalCluster) -> int:
    """The pages the peers of node 1 hold for it."""
    return sum(node.client().stats().foreign_pages for node in cluster.nodes[1:])


@contextlib.contextmanager
def spilled(
    tmp_path: Path, pages: list[bytes], count: int, pool: str, size: str, *flags: str
) -> Iterator[tuple[LocalCluster, bytes]]:
    """A 3-node cluster whose node 1 serves export "disk" of `size` from a pool of `pool`
    (and `flags`), `count` real pages (`pages` cycled) written into it, most of which went to
    the peers: over half of them held twice there.  The cluster and the data."""
    node1 = ["--pool-limit", pool, "--nbd-listen", "127.0.0.1:0", "--nbd-export", f"disk:{size}"]
    node1 += flags
    common = ["--pool-limit", "64Mi", "--heartbeat-interval", "0.2", "--down-after", "1"]
    data = b"".join(pages[n % len(pages)] for n in range(count))
    with LocalCluster(3, common=common, per_node=[node1]) as cluster:
        src = tmp_path / "in.img"
        src.write_bytes(data)
        run("nbdcopy", str(src), f"nbd://127.0.0.1:{nbd_port(cluster.nodes[0])}/disk")
        assert eventually(lambda: foreign_pages(cluster) > count)
        yield cluster, data


@pytest.mark.slow
def test_an_export_larger_than_the_pool_spills_to_peers_and_survives_a_killed_peer(
    tmp_path: Path, sample_pages: list[bytes]
) -> None:
    """32 MiB of real pages, a twelfth of them incompressible: those are stored raw, longer
    than a holder's slot once sealed, and go to the peers all the same, split over two slots
    there (they went to node 1's disk only, whatever --replicas said)."""
    need("nbdcopy")
    with spilled(tmp_path, sample_pages, 8192, "4Mi", "48Mi") as (cluster, data):
        owner = cluster.nodes[0]
        time.sleep(3)  # down_after three times over: no page is refused and offered again
        assert metric_value(owner, "ramster_remote_put_refusals_total") == 0
        assert metric_value(owner, "ramster_remote_disk_copies_total") == 0
        # every page out of RAM is on the peers, the raw ones too: none in node 1's backing file
        assert metric_value(owner, "ramster_backing_written_back_total") == 0
        with owner.client() as client:
            assert metric_value(owner, "ramster_remote_pages") == client.stats().written_back_pages
        cluster.nodes[2].send_signal(signal.SIGKILL)
        cluster.nodes[2].wait()
        back = tmp_path / "back.img"
        run("nbdcopy", f"nbd://127.0.0.1:{nbd_port(owner)}/disk", str(back))
        assert back.read_bytes()[: len(data)] == data


@contextlib.contextmanager
def frozen(nodes: list[LocalNode]) -> Iterator[None]:
    """`nodes` stopped (SIGSTOP) for the block, and let go on (SIGCONT) after it."""
    for node in nodes:
        node.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for node in nodes:
            node.send_signal(signal.SIGCONT)


@pytest.mark.slow
def test_a_read_of_pages_on_frozen_peers_waits_for_them_rather_than_failing(
    tmp_path: Path, sample_pages: list[bytes]
) -> None:
    """Both peers freeze, long enough for node 1 to mark them down, while they hold the only
    copies of most of its pages: a read of the export waits for them (--nbd-read-wait) rather
    than failing with EIO, which a kernel swapping to the export would turn into a killed
    process, and once they go on every byte reads as written.  (It failed at once.)"""
    need("nbdcopy")
    with spilled(tmp_path, sample_pages, 4096, "1Mi", "16Mi") as (cluster, data):
        owner, back = cluster.nodes[0], tmp_path / "back.img"
        with frozen(cluster.nodes[1:]):
            assert eventually(lambda: metric_value(owner, "ramster_peers_up") == 0)
            uri = f"nbd://127.0.0.1:{nbd_port(owner)}/disk"
            reader = subprocess.Popen(["nbdcopy", uri, str(back)], stderr=subprocess.PIPE)
            assert eventually(lambda: '"nbd_read_waiting"' in owner.log())
            time.sleep(1)
            assert reader.poll() is None  # still waiting, not failed
        _, err = reader.communicate(timeout=60)
        assert reader.returncode == 0, err
        assert back.read_bytes()[: len(data)] == data
        assert read_waits(owner, "resumed") > 0 and read_waits(owner, "failed") == 0


@pytest.mark.slow
def test_an_unaligned_write_to_a_page_on_frozen_peers_waits_for_them(
    tmp_path: Path, sample_pages: list[bytes]
) -> None:
    """An unaligned WRITE reads the block it changes part of first: with that block's copies
    on frozen peers it waits for them rather than failing, and the block then holds the old
    bytes around the new ones."""
    need("qemu-io", "nbdcopy")
    with spilled(tmp_path, sample_pages, 4096, "1Mi", "16Mi") as (cluster, data):
        owner = cluster.nodes[0]
        uri = f"nbd://127.0.0.1:{nbd_port(owner)}/disk"
        with frozen(cluster.nodes[1:]):
            assert eventually(lambda: metric_value(owner, "ramster_peers_up") == 0)
            write = ["qemu-io", "-f", "raw", "-c", "write -P 0xab 100 512", uri]
            writer = subprocess.Popen(write, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            assert eventually(lambda: '"nbd_read_waiting"' in owner.log())
            assert writer.poll() is None
        out, _ = writer.communicate(timeout=60)
        assert writer.returncode == 0 and b"error" not in out.lower(), out
        back = tmp_path / "back.img"
        run("nbdcopy", uri, str(back))
        want = data[:100] + b"\xab" * 512 + data[612:]
        assert back.read_bytes()[: len(data)] == want


@pytest.mark.slow
def test_a_stop_ends_a_read_waiting_for_frozen_peers(
    tmp_path: Path, sample_pages: list[bytes]
) -> None:
    """SIGTERM while a read waits for frozen peers: the read fails rather than holding the stop
    for the rest of its wait (15 s by default), and the node exits cleanly."""
    need("nbdcopy")
    with spilled(tmp_path, sample_pages, 4096, "1Mi", "16Mi") as (cluster, _):
        owner = cluster.nodes[0]
        uri = f"nbd://127.0.0.1:{nbd_port(owner)}/disk"
        with frozen(cluster.nodes[1:]):
            assert eventually(lambda: metric_value(owner, "ramster_peers_up") == 0)
            reader = subprocess.Popen(["nbdcopy", uri, str(tmp_path / "back.img")])
            assert eventually(lambda: '"nbd_read_waiting"' in owner.log())
            assert owner.stop() == 0
            assert reader.wait(timeout=60) != 0
        failed = [json.loads(line) for line in owner.log().splitlines() if "read_failed" in line]
        assert failed and all(f["waited_s"] < 15 for f in failed)  # not the whole default wait


def read_waits(node: LocalNode, outcome: str) -> float:
    samples = metric_samples(node, "ramster_nbd_read_waits_total")
    return sum(value for labels, value in samples if labels["outcome"] == outcome)


@pytest.mark.slow
def test_a_read_of_pages_on_frozen_peers_fails_once_its_wait_is_over(
    tmp_path: Path, sample_pages: list[bytes]
) -> None:
    """With --nbd-read-wait 0.5, a read of pages whose holders stay frozen fails with EIO
    soon after (logged), the node stays healthy, and once they go on the export reads back
    whole."""
    need("nbdcopy")
    flags = ("--nbd-read-wait", "0.5")
    with spilled(tmp_path, sample_pages, 4096, "1Mi", "16Mi", *flags) as (cluster, data):
        owner, back = cluster.nodes[0], tmp_path / "back.img"
        uri = f"nbd://127.0.0.1:{nbd_port(owner)}/disk"
        with frozen(cluster.nodes[1:]):
            assert eventually(lambda: metric_value(owner, "ramster_peers_up") == 0)
            copy = subprocess.run(["nbdcopy", uri, str(back)], capture_output=True, timeout=60)
            assert copy.returncode != 0 and b"Input/output error" in copy.stderr
            assert '"nbd_read_failed"' in owner.log() and read_waits(owner, "failed") > 0
        assert eventually(lambda: metric_value(owner, "ramster_peers_up") == 2)
        run("nbdcopy", uri, str(back))
        assert back.read_bytes()[: len(data)] == data


@pytest.mark.slow
def test_blocks_written_as_zeros_free_their_copies_on_peers_and_disk(
    tmp_path: Path, sample_pages: list[bytes]
) -> None:
    need("qemu-io", "nbdcopy")
    with spilled(tmp_path, sample_pages, 4096, "1Mi", "32Mi") as (cluster, data):
        owner = cluster.nodes[0]
        uri = f"nbd://127.0.0.1:{nbd_port(owner)}/disk"
        run("qemu-io", "-f", "raw", "-c", f"write -P 0 0 {len(data)}", uri)  # WRITEs, not zeroes
        assert eventually(lambda: foreign_pages(cluster) == 0)  # the peers flushed them
        with owner.client() as client:
            stats = client.stats()
            assert (stats.stored_pages, stats.written_back_pages) == (0, 0)
        back = tmp_path / "back.img"
        run("nbdcopy", uri, str(back))
        assert back.read_bytes() == bytes(32 * MiB)


def restart_with(node: LocalNode, *flags: str) -> LocalNode:
    """Stop `node` and start it again on its data, its --nbd-export flags replaced by `flags`
    (its ports stay, as its peers know them)."""
    assert node.stop() == 0
    args, kept = iter(node.args), []
    for arg in args:
        if arg in ("--nbd-export", "--nbd-drop"):
            next(args)
        else:
            kept.append(arg)
    node.args = [*kept, *flags]
    return node.start()


@pytest.mark.slow
def test_a_dropped_export_frees_its_pages_in_ram_on_peers_and_on_disk(
    tmp_path: Path, sample_pages: list[bytes]
) -> None:
    need("nbdcopy")
    with spilled(tmp_path, sample_pages, 4096, "1Mi", "32Mi") as (cluster, data):
        owner = cluster.nodes[0]
        (disk_map,) = owner.data_dir.glob("nbd-pool-*.map")
        restart_with(owner, "--nbd-export", "other:1Mi", "--nbd-drop", "disk")
        (dropped,) = [json.loads(line) for line in owner.log().splitlines() if "_dropped" in line]
        assert (dropped["export"], dropped["pages"]) == ("disk", len(data) // 4096)
        assert not disk_map.exists() and len(list(owner.data_dir.glob("nbd-pool-*.map"))) == 1
        with owner.client() as client:
            stats = client.stats()
            assert (stats.stored_pages, stats.written_back_pages) == (0, 0)
        assert eventually(lambda: foreign_pages(cluster) == 0)  # the peers flushed them
        restart_with(owner, "--nbd-export", "other:1Mi", "--nbd-drop", "disk")  # nothing left
        assert '"event": "nbd_export_drop_skipped"' in owner.log()
        restart_with(owner, "--nbd-export", "disk:32Mi")  # declared again: a new, empty disk
        back = tmp_path / "back.img"
        run("nbdcopy", f"nbd://127.0.0.1:{nbd_port(owner)}/disk", str(back))
        assert back.read_bytes() == bytes(32 * MiB)
    done = node_exits(
        tmp_path / "x", "--nbd-listen", "127.0.0.1:0", "--nbd-export", "a:1Mi", "--nbd-drop", "a"
    )
    assert "--nbd-drop names 'a', which --nbd-export declares" in done.stderr


def read_back(uri: str, data: bytes, back: Path) -> int:
    """Read an export back: every block must be as written or zeros (lost, never wrong); how
    many are as written."""
    run("nbdcopy", uri, str(back))
    read = back.read_bytes()
    blocks = [(read[at : at + 4096], data[at : at + 4096]) for at in range(0, len(data), 4096)]
    assert all(got in (want, bytes(4096)) for got, want in blocks)
    return sum(got == want for got, want in blocks)


def fill(uri: str, data: bytes, src: Path) -> None:
    """Write `data` into an export whose node's disk fills up on the way."""
    src.write_bytes(data)
    copy = subprocess.run(["nbdcopy", str(src), uri], capture_output=True, text=True)
    assert copy.returncode and "No space left on device" in copy.stderr


@ROOT
def test_a_full_disk_fails_writes_with_enospc_and_never_the_block_map(tmp_path: Path) -> None:
    """Writes to parts of an export's block map never touched before, once the disk is full:
    ENOSPC, and the node goes on, reading the export after (when the map was a shared mapping,
    a store, and on tmpfs a read, of a part the filesystem had no block for killed it with
    SIGBUS); a new export's map that finds no room stops the start, saying so."""
    need("qemu-io")
    with small_disk(tmp_path / "disk", "8M") as disk:
        with nbd_node("--nbd-export", "disk:64Mi", data_dir=disk / "data") as node:
            uri = f"nbd://127.0.0.1:{nbd_port(node)}/disk"
            fill_up(disk / "filler")
            for offset in ("60M", "0", "30M"):
                done = subprocess.run(
                    ["qemu-io", "-f", "raw", "-c", f"write -P 7 {offset} 4k", uri],
                    capture_output=True,
                    text=True,
                )
                assert "No space left on device" in done.stdout + done.stderr
            assert run("qemu-io", "-f", "raw", "-c", "read -P 0 0 64M", uri)
            assert node.running and node.stop() == 0
        done = node_exits(
            disk / "data",
            *("--nbd-listen", "127.0.0.1:0", "--nbd-export", "disk:64Mi"),
            *("--nbd-export", "big:1Gi"),
        )
        assert done.returncode and ".map: No space left on device" in done.stderr


@ROOT
@pytest.mark.parametrize("ram", ["4Mi", "64Mi"])
def test_a_node_whose_disk_filled_up_saves_what_it_held_and_comes_back(
    tmp_path: Path, ram: str
) -> None:
    """Writes fail with ENOSPC once the disk (8 MiB) could not take more, whether RAM is
    smaller (its pages go to disk as it fills) or larger (the disk could not save what RAM
    holds at a stop); the graceful stop writes every page in RAM back, and after the restart
    every block that read as written before reads so again.  (The pool log's rewrite on a
    full disk: tests/node/test_pools_log.py.)"""
    need("nbdcopy")
    data, args = os.urandom(32 * MiB), ("--pool-limit", ram, "--nbd-export", "disk:64Mi")
    with small_disk(tmp_path / "disk", "8m") as disk:
        with nbd_node(*args, data_dir=disk / "data") as node:
            uri = f"nbd://127.0.0.1:{nbd_port(node)}/disk"
            fill(uri, data, tmp_path / "in.img")
            held = read_back(uri, data, tmp_path / "back.img")
            assert metric_value(node, "ramster_backing_room_bytes") > 0
            assert node.stop() == 0
            (saved,) = [
                json.loads(line) for line in node.log().splitlines() if "written_back" in line
            ]
            assert saved["refused"] == 0 < saved["pages"]
        with nbd_node(*args, data_dir=disk / "data") as node:
            uri = f"nbd://127.0.0.1:{nbd_port(node)}/disk"
            assert read_back(uri, data, tmp_path / "back.img") == held > MiB // 4096


@ROOT
@pytest.mark.slow
def test_an_owner_whose_peers_froze_saves_its_outbox_on_a_small_disk(tmp_path: Path) -> None:
    """Both peers are frozen (SIGSTOP) while node 1 writes more than its RAM and disk hold:
    the evicted pages wait in the outbox, then go to disk once the peers are down; the room
    kept on disk covers the outbox too, so writes fail with ENOSPC before a stop could strand
    any, and after a graceful stop and restart every block held reads back."""
    need("nbdcopy")
    data = os.urandom(24 * MiB)
    with small_disk(tmp_path / "disk", "8m") as disk:
        node1 = ["--pool-limit", "4Mi", "--nbd-listen", "127.0.0.1:0", "--nbd-export"]
        node1 += ["disk:64Mi", "--data-dir", str(disk / "data")]
        common = ["--heartbeat-interval", "0.2", "--down-after", "1", "--peer-timeout", "0.5"]
        with LocalCluster(3, common=common, per_node=[node1]) as cluster:
            owner, peers = cluster.nodes[0], cluster.nodes[1:]
            uri = f"nbd://127.0.0.1:{nbd_port(owner)}/disk"
            for peer in peers:
                peer.send_signal(signal.SIGSTOP)
            try:
                fill(uri, data, tmp_path / "in.img")
                held = read_back(uri, data, tmp_path / "back.img")
                assert owner.stop() == 0
            finally:
                for peer in peers:
                    peer.send_signal(signal.SIGCONT)
            assert '"outbox_not_saved"' not in owner.log()
            (saved,) = [
                json.loads(line) for line in owner.log().splitlines() if "written_back" in line
            ]
            assert saved["refused"] == 0
            owner.start()
            uri = f"nbd://127.0.0.1:{nbd_port(owner)}/disk"
            assert read_back(uri, data, tmp_path / "back.img") == held > MiB // 4096


@ROOT
@pytest.mark.slow
def test_an_owner_whose_disk_filled_up_keeps_its_peers_and_comes_back(
    tmp_path: Path, sample_pages: list[bytes]
) -> None:
    """Node 1's disk fills while its pages go to peers: the journal appends into the room it
    keeps past its end, so a discard's records are saved rather than left waiting; the node
    stops cleanly, saving every page in RAM and every record, and starts again on its data,
    where every block reads as before the stop (the discarded ones as zeros, not as errors).
    (The node's own writes fail with ENOSPC while the disk still has the room it keeps to save
    RAM, so a file of someone else's fills the rest.)"""
    need("nbdcopy", "qemu-io")
    real = b"".join(sample_pages[n % len(sample_pages)] for n in range(4096))
    data = real + os.urandom(32 * MiB) + real  # to peers until they are full, then to disk
    # room for RAM, an outbox in flight and the journal's room (8 MiB)
    with small_disk(tmp_path / "disk", "32m") as disk:
        node1 = ["--pool-limit", "4Mi", "--nbd-listen", "127.0.0.1:0", "--nbd-export"]
        node1 += ["disk:64Mi", "--data-dir", str(disk / "data")]
        # no peer goes down here: a busy machine must not make the owner think one did
        common = ["--pool-limit", "256Mi", "--down-after", "60"]
        common += ["--foreign-limit", "8Mi"]
        with LocalCluster(3, common=common, per_node=[node1]) as cluster:
            owner = cluster.nodes[0]
            uri = f"nbd://127.0.0.1:{nbd_port(owner)}/disk"
            fill(uri, data, tmp_path / "in.img")
            fill_up(disk / "filler")
            # a discard of pages on peers, once the disk is full: its records fit the room
            run("qemu-io", "-f", "raw", "-c", f"discard 0 {MiB}", uri)
            held = read_back(uri, data, tmp_path / "back.img")
            assert held > len(real) // 4096
            assert (tmp_path / "back.img").read_bytes()[:MiB] == bytes(MiB)
            waiting = "ramster_remote_journal_waiting_records"  # buffered, or refused by the disk
            assert eventually(lambda: metric_value(owner, waiting) == 0)
            assert owner.stop() == 0
            log = owner.log()
            assert '"remote_journal_waiting"' not in log and '"remote_journal_not_saved"' not in log
            (saved,) = [json.loads(line) for line in log.splitlines() if "written_back" in line]
            assert saved["refused"] == 0
            fill_up(disk / "filler")  # what the backing file gave back when it closed
            owner.start()
            assert '"event": "remote_journal_not_compacted"' in owner.log()
            uri = f"nbd://127.0.0.1:{nbd_port(owner)}/disk"
            assert read_back(uri, data, tmp_path / "back.img") == held


@ROOT
@pytest.mark.slow
def test_an_owner_whose_journal_found_no_room_keeps_what_it_names_and_comes_back(
    tmp_path: Path, sample_pages: list[bytes]
) -> None:
    """Node 1 starts on a disk too full for its journal's room, and the disk fills up while its
    pages go to peers: the records naming their copies wait in memory, so each page keeps its
    bytes in the outbox until they are written, and the stop, which cannot save the records,
    writes those pages to the backing file; after the restart every block reads as before the
    stop.  (Pages whose bytes went once peers had them lost ~2,300 of ~9,000 blocks here.)"""
    need("nbdcopy")
    real = b"".join(sample_pages[n % len(sample_pages)] for n in range(4096))  # 16 MiB
    data = real + bytes(16 * MiB) + real
    with small_disk(tmp_path / "disk", "32m") as disk:
        filler = disk / "filler"
        fill_up(filler)
        os.truncate(filler, filler.stat().st_size - 7 * MiB)  # less than the journal's room
        node1 = ["--pool-limit", "4Mi", "--nbd-listen", "127.0.0.1:0", "--nbd-export"]
        node1 += ["disk:64Mi", "--data-dir", str(disk / "data")]
        # no peer goes down here: a busy machine must not make the owner think one did
        common = ["--pool-limit", "256Mi", "--down-after", "60"]
        with LocalCluster(3, common=common, per_node=[node1]) as cluster:
            owner = cluster.nodes[0]
            uri = f"nbd://127.0.0.1:{nbd_port(owner)}/disk"
            src = tmp_path / "in.img"
            src.write_bytes(real)
            subprocess.run(["nbdcopy", str(src), uri], capture_output=True)  # may fill the disk
            fill_up(filler)  # what the backing file's room left
            src.write_bytes(bytes(32 * MiB) + real)  # the second copy: the zeros are skipped
            copy = subprocess.run(
                ["nbdcopy", "--destination-is-zero", str(src), uri], capture_output=True, text=True
            )
            # ENOSPC once the outbox holds what the disk can save
            assert "No space left on device" in copy.stderr
            held = read_back(uri, data, tmp_path / "back.img")
            assert metric_value(owner, "ramster_remote_journal_waiting_records") > 0
            assert owner.stop() == 0
            log = owner.log()
            assert '"remote_journal_not_saved"' in log and '"outbox_not_saved"' not in log
            (saved,) = [json.loads(line) for line in log.splitlines() if "written_back" in line]
            assert saved["refused"] == 0
            owner.start()
            uri = f"nbd://127.0.0.1:{nbd_port(owner)}/disk"
            assert read_back(uri, data, tmp_path / "back.img") == held > len(real) // 4096
