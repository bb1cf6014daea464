"""⑦ broadcast_object over a real two-rank gloo group on CPU: messages below, at and above the first broadcast's
head (BCAST_HEAD - 8 pickle bytes) arrive equal on rank 1, in order, and a short one after a long one is not
mixed with the long one's leftover bytes."""

from __future__ import annotations

import datetime as dt
import pickle
from pathlib import Path

import torch.distributed as dist

from ds4f.distributed.comm import BCAST_HEAD, broadcast_object, gloo_group
from tests.ranks import spawn_ranks


def _messages() -> list[object]:
    room = BCAST_HEAD - 8
    out: list[object] = [("step", (1, [("req", [7], 5, 3, [], 0, True)], [])), None]
    for n in (room, room + 1, 3 * BCAST_HEAD + 5):  # pickled bytes exactly at, one past, well past the head
        over = len(pickle.dumps(b"x" * n, protocol=pickle.HIGHEST_PROTOCOL)) - n  # constant over these lengths
        b = b"x" * (n - over)
        assert len(pickle.dumps(b, protocol=pickle.HIGHEST_PROTOCOL)) == n
        out.append(b)
    out.append(("ping", list(range(10))))
    return out


def _rank_main(rank: int, port: int, out: str) -> None:
    store = dist.TCPStore("127.0.0.1", port, None, False, timeout=dt.timedelta(seconds=30))
    pg = gloo_group(dist.PrefixStore("ctrl", store), rank, 2, 30.0, "127.0.0.1")
    got = [broadcast_object(pg, m if rank == 0 else None, rank) for m in _messages()]
    Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(got))


def test_broadcast_object_head_sizes(tmp_path: Path) -> None:
    codes = spawn_ranks(_rank_main, 2, str(tmp_path))
    assert codes == [0, 0], f"rank exit codes {codes}"
    want = _messages()
    for r in range(2):
        assert pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) == want, f"rank {r}"
