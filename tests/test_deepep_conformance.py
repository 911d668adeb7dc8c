"""Every DeepEP call in our code, and the ``deep_ep`` fake, against the real DeepEP sources.

The pinned wheel (``sgl-deep-ep`` 0.1.2.post1, DeepEP 2.1.0) is downloaded, never installed,
by ``bash .ci/deepep_wheel.sh``; it needs CUDA to import, so it is read as text
(``tests/deepep_check.py``). Without the wheel these tests skip.
"""

from __future__ import annotations

import ast
import os
import pathlib
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deepep_check as dc  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
WHEEL = (
    ROOT / ".ci/cache/deepep"
    / "sgl_deep_ep-0.1.2.post1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"
)  # fmt: skip
FAKE = ROOT / "tests/fakes/deep_ep.py"
DOC = ROOT / "docs/deepep.md"


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    if not WHEEL.exists():
        pytest.skip(f"DeepEP wheel not downloaded ({WHEEL.relative_to(ROOT)}): run "
                    "`bash .ci/deepep_wheel.sh` (needs the package index)")  # fmt: skip
    return dc.read_wheel(WHEEL)


@pytest.fixture(scope="module")
def api(sources) -> dc.Api:
    return dc.load_api(sources)


def _ours() -> dict[str, str]:
    return dc.our_modules([ROOT / "eplb_plugin", ROOT / "integrations"], ROOT)


def _altered(sources: dict[str, str], path: str, old: str, new: str, after: str = "") -> dict:
    """A copy of ``sources`` with the first ``old`` after ``after`` in ``path`` replaced."""
    text = sources[path]
    start = text.index(after) if after else 0
    at = text.index(old, start)
    return {**sources, path: text[:at] + new + text[at + len(old) :]}


# ---------------------------------------------------------------------------- our calls
def test_every_deepep_call_of_ours_matches_the_real_signatures(api):
    assert api.version == "2.1.0"
    calls, findings = dc.check_tree(api, _ours())
    assert not findings, "\n".join(map(str, findings))
    found = {(c.path, c.cls, c.method) for c in calls}
    # discovery works: the known call sites are among those found (new ones add to these)
    for path in ("eplb_plugin/comm/deepep.py", "integrations/transformers/comm.py"):
        for method in ("__init__", "get_dispatch_layout", "dispatch", "get_dispatch_config"):
            assert (path, "Buffer", method) in found, (path, method)
    assert ("integrations/transformers/comm.py", "Buffer", "combine") in found
    assert ("integrations/transformers/comm.py", "Config", "get_nvl_buffer_size_hint") in found
    unpacked = {(c.path, c.method): c.unpacked for c in calls if c.unpacked is not None}
    assert unpacked[("eplb_plugin/comm/deepep.py", "dispatch")] == 6


def test_checker_reports_a_renamed_keyword_and_a_changed_return_arity(sources, api):
    legacy = "deep_ep/buffers/legacy.py"
    renamed = _altered(sources, legacy, "num_tokens_per_expert: Optional",
                       "num_tokens_per_exp: Optional", after="    def dispatch(")  # fmt: skip
    changed = _altered(renamed, legacy,
                       "return recv_x, recv_topk_weights, EventOverlap(event)",
                       "return recv_x, EventOverlap(event)", after="    def combine(")  # fmt: skip
    _, findings = dc.check_tree(dc.load_api(changed), _ours())
    text = "\n".join(map(str, findings))
    assert "keyword `num_tokens_per_expert` is not a parameter of Buffer.dispatch" in text
    assert "unpacks 3 values, Buffer.combine" in text and "returns 2 or 3" in text
    # both modules dispatch with that keyword; only transformers combines
    assert sum("num_tokens_per_expert" in str(f) for f in findings) == 2
    assert [f.where.split(":")[0] for f in findings if "combine" in str(f)] == [
        "integrations/transformers/comm.py"
    ]
    # and the unaltered sources report nothing
    assert not dc.check_tree(api, _ours())[1]


SYNTHETIC = """
import deep_ep
from deep_ep import Buffer


def make(group):
    return deep_ep.Buffer(group, 1, 2, False, 24, True, False, None, False, False, None, 9)


def use(group, buf, x, h):
    own = Buffer(group)
    own.combine(x)
    own.combine(x, h, handle=h)
    a, b = own.get_dispatch_layout(x, 8)
    deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8)
    deep_ep.Bufer(group)
    buf.dispatch(x)
    buf.dispatch(x, topk=x)  # deep_ep: Buffer
    buf.dispatch(x)  # deep_ep: none
"""


def test_checker_reports_each_kind_of_mistake(api):
    calls, findings = dc.check_tree(api, {"synthetic.py": SYNTHETIC})
    got = [(int(f.where.split(":")[1]), f.message) for f in findings]

    def on(line: int, text: str) -> bool:
        return any(n == line and text in m for n, m in got)

    assert on(
        7,
        "12 positional arguments, Buffer.__init__ (deep_ep/buffers/legacy.py:33) takes at most 11",
    )
    assert on(12, "required parameter `handle`")
    assert on(13, "`handle` given both by position and by keyword")
    assert on(14, "unpacks 2 values, Buffer.get_dispatch_layout")
    assert on(15, "required parameter `num_experts`")
    assert on(16, "deep_ep has no `Bufer`")
    assert on(17, "cannot tell whether `buf`")  # an untyped receiver is an error, not skipped
    assert on(18, "keyword `topk` is not a parameter of Buffer.dispatch")
    assert not [m for n, m in got if n == 19]  # marked as not DeepEP
    assert len(got) == 8, got


# ---------------------------------------------------------------------------- the fake
def test_the_fake_has_the_real_signatures(api):
    findings = dc.check_fake(api, FAKE.read_text())
    assert not findings, "\n".join(map(str, findings))
    # every method our code calls is in the fake, so the tests that run our code on the fake
    # go through signatures checked above
    fake = dc.load_api({"tests/fakes/deep_ep.py": FAKE.read_text(), "deep_ep/__init__.py": ""})
    calls, _ = dc.check_tree(api, _ours())
    called = {(c.cls, c.method) for c in calls}
    assert ("Buffer", "dispatch") in called
    missing = [
        c for c in called if c[1] not in fake.classes.get(c[0], dc.ApiClass("", {}, "")).methods
    ]
    assert not missing


def test_fake_check_reports_a_drift(sources):
    legacy = "deep_ep/buffers/legacy.py"
    altered = _altered(sources, legacy, "expert_alignment: int = 1, num_worst_tokens: int = 0,",
                       "expert_alignment: int = 2, num_worst_tokens: int = 0,",
                       after="    def dispatch(")  # fmt: skip
    altered = _altered(altered, legacy, "return num_tokens_per_rank, num_tokens_per_rdma_rank,",
                       "return num_tokens_per_rdma_rank,")  # fmt: skip
    text = "\n".join(map(str, dc.check_fake(dc.load_api(altered), FAKE.read_text())))
    assert "Buffer.dispatch: parameters" in text and "expert_alignment=2" in text
    assert "Buffer.get_dispatch_layout: returns [5] values, the real one [4]" in text


# ---------------------------------------------------------------------------- semantics
def _method_node(sources: dict, path: str, cls: str, name: str) -> ast.FunctionDef:
    for node in ast.walk(ast.parse(sources[path])):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return item
    raise AssertionError(f"{cls}.{name} not in {path}")


def test_supported_ep_sizes_are_deepeps_config_keys(sources):
    """Our DEEPEP_RANK_COUNTS (refused otherwise) and the fake's are the keys of DeepEP's
    recommended dispatch and combine configs, without which dispatch asserts."""
    from eplb_plugin.comm.deepep import DEEPEP_RANK_COUNTS

    for method in ("get_dispatch_config", "get_combine_config"):
        fn = _method_node(sources, "deep_ep/buffers/legacy.py", "Buffer", method)
        maps = [n for n in ast.walk(fn) if isinstance(n, ast.Dict)]
        assert len(maps) == 1
        assert tuple(ast.literal_eval(k) for k in maps[0].keys) == DEEPEP_RANK_COUNTS
    fake = ast.parse(FAKE.read_text())
    assigned = {t.id: n.value for n in fake.body if isinstance(n, ast.Assign) for t in n.targets}
    assert ast.literal_eval(assigned["_CONFIG_RANKS"]) == DEEPEP_RANK_COUNTS


def test_no_wait_on_the_event_of_a_synchronous_op(api, sources):
    """DeepEP's EventOverlap asserts it holds an event, which only ``async_finish=True`` ops
    return; our code never passes async_finish, so it must never wait on a returned event."""
    wait = _method_node(sources, "deep_ep/utils/event.py", "EventOverlap", "current_stream_wait")
    assert "assert self.event is not None" in ast.unparse(wait)
    calls, _ = dc.check_tree(api, _ours())
    asynchronous = [
        c for c in calls for k in c.node.keywords
        if k.arg == "async_finish" and not (isinstance(k.value, ast.Constant) and not k.value.value)
    ]  # fmt: skip
    assert not asynchronous
    assert not [c.where() for c in calls if c.method == "current_stream_wait"]


def test_dispatch_returns_counts_then_handle_and_cached_dispatch_returns_neither(sources):
    """The 4th value of a layout-mode dispatch is the received count per local expert and the
    5th the handle; a cached dispatch (with a handle) returns None for both."""
    fn = _method_node(sources, "deep_ep/buffers/legacy.py", "Buffer", "dispatch")
    tuples = [r.value for r in dc._returns_in(fn) if isinstance(r.value, ast.Tuple)]
    names = [[ast.unparse(e) for e in t.elts] for t in tuples]
    assert ["None", "None", "None", "None"] in [n[1:5] for n in names]
    full = [n for n in names if n[3] != "None"]
    assert full and all(n[3:5] == ["num_recv_tokens_per_expert_list", "handle"] for n in full)


# | `deep_ep/<file>.py:<line>` | `text` | or, for text with backticks, | `` text `` |
DOC_CITATION = re.compile(r"\| `(deep_ep/[\w/]+\.py):(\d+)` \| (?:`` (.+?) ``|`([^`]+)`) \|")


def test_the_docs_cite_the_pinned_sources_line_by_line(sources):
    """Every cited line of docs/deepep.md's table holds the quoted text."""
    rows = [r for r in DOC.read_text().splitlines() if r.startswith("|") and "| `deep_ep/" in r]
    cited = [DOC_CITATION.search(r) for r in rows]
    assert all(cited), [r for r, m in zip(rows, cited) if not m]
    assert len(cited) >= 15
    wrong = []
    for path, line, doubled, single in (m.groups() for m in cited):
        text = doubled or single
        lines = sources[path].splitlines()
        if not (0 < int(line) <= len(lines) and text in lines[int(line) - 1]):
            wrong.append(f"{path}:{line} does not hold {text!r}")
    assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------------------- our rules
# (no wheel needed: what the communicators refuse, by the facts checked above)
def test_pack_rows_puts_a_header_and_the_bytes_of_each_destination_in_rows():
    import torch

    from eplb_plugin.comm.deepep import HEADER_BYTES, pack_rows

    send = torch.arange(100, dtype=torch.int64).to(torch.uint8)
    splits = [40, 0, 60]  # 48-byte rows: 32 payload bytes each
    x, dst = pack_rows(send, splits, rank=5, row_bytes=48)
    assert x.dtype == torch.bfloat16 and x.shape == (2 + 0 + 2, 24)
    assert dst.flatten().tolist() == [0, 0, 2, 2]
    table = x.view(torch.uint8)
    head = table[:, :HEADER_BYTES].contiguous().view(torch.int64)
    assert head.tolist() == [[5, 0], [5, 1], [5, 0], [5, 1]]
    body = table[:, HEADER_BYTES:]
    assert torch.equal(body[:2].reshape(-1)[:40], send[:40])
    assert torch.equal(body[2:].reshape(-1)[:60], send[40:])
    assert not body[1, 8:].any() and not body[3, 28:].any()  # zero padding


def test_deepep_communicator_refuses_buffers_it_must_not_use():
    from eplb_plugin.comm.deepep import check_buffer

    class ElasticBuffer:
        pass

    class Buffer:
        def __init__(self, nvl, rdma, low_latency_mode=False):
            self.num_nvl_bytes, self.num_rdma_bytes = nvl, rdma
            self.low_latency_mode = low_latency_mode

        def get_dispatch_layout(self):
            pass

    with pytest.raises(ValueError, match="not a ElasticBuffer"):
        check_buffer(ElasticBuffer(), 10, 0, 64)
    with pytest.raises(ValueError, match="low-latency mode"):
        check_buffer(Buffer(100, 100, low_latency_mode=True), 10, 0, 64)
    with pytest.raises(ValueError, match="need 200 / 0"):
        check_buffer(Buffer(100, 0), 200, 0, 64)
    check_buffer(Buffer(200, 0), 200, 0, 64)


def test_ep_sizes_without_a_deepep_config_are_refused_or_fall_back_to_torch():
    import torch

    from eplb_plugin.integrations.transformers.comm import TorchAllToAll, make_communicator

    with pytest.raises(ValueError, match="no dispatch config for 3 ranks"):
        make_communicator("deepep", None, 3, 2, 16, torch.device("cpu"))
    assert isinstance(
        make_communicator("auto", None, 3, 2, 16, torch.device("cuda")), TorchAllToAll
    )


def _one_rank_deepep(rank: int, world_size: int) -> str:
    from eplb_plugin.comm.deepep import DeepEPCommunicator

    try:
        DeepEPCommunicator(timeout_s=10)
    except ValueError as exc:
        return str(exc)
    return "accepted"


def test_deepep_communicator_refuses_one_rank():
    from dist_utils import run_ranks

    (message,) = run_ranks(_one_rank_deepep, 1, timeout=60)
    assert "no dispatch config for 1 ranks" in message
