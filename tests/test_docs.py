"""The documentation says what the code does: README.md, docs/*.md and experiments/README.md.

Truths:
  * the API tables (README.md `## API`, docs/api.md: every table whose first column is headed
    `call`) against `inspect.signature` of the functions they name: every listed argument is a
    parameter, every parameter is listed, `*` / `*args` separate the keyword-only ones as in the
    code, and a listed default equals the real one;
  * every relative link (and `#anchor` into a markdown page) points at a file (and heading) that
    exists;
  * every ```python block is either read by a test through `code_block(page, heading)` or marked
    `<!-- not run: reason -->` on the line before it, so a new block cannot go untested silently;
  * the blocks this module runs do what their text says (outputs equal the base model at M = 0,
    the printed counts, a loss that falls on 8 devices).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.stack import needs_flax_models

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINKED = [*PAGES, REPO / "experiments" / "README.md"]
NOT_RUN = re.compile(r"^<!-- not run: (\S.*\S) -->$")


# --- reading pages ---------------------------------------------------------------------------

def _blocks(page: Path) -> list[dict]:
    """Every fenced block of `page`: its language, code, section heading, index among the section's
    python blocks, and the not-run reason on the line before it (or None). Headings inside code
    fences (bash or python comments) are not headings."""
    blocks, heading, fence, counts, previous = [], None, None, {}, ""
    for line in page.read_text().splitlines():
        if fence is None:
            if line.startswith("```"):
                fence = {"lang": line[3:].strip(), "code": [], "heading": heading,
                         "reason": (m.group(1) if (m := NOT_RUN.match(previous)) else None)}
            elif re.match(r"#{1,6} ", line):
                heading = line.lstrip("#").strip()
            if line.strip():
                previous = line.strip()
        elif line.startswith("```"):
            fence["code"] = "\n".join(fence["code"]) + "\n"
            if fence["lang"] == "python":
                fence["index"] = counts.get(heading, 0)
                counts[heading] = fence["index"] + 1
            blocks.append(fence)
            fence, previous = None, ""
        else:
            fence["code"].append(line)
    assert fence is None, f"{page.name}: a code fence is never closed"
    return blocks


def _headings(page: Path) -> list[str]:
    headings, in_fence = [], False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and re.match(r"#{1,6} ", line):
            headings.append(line.lstrip("#").strip())
    return headings


def _section(page: str, heading: str) -> str:
    """The one heading of `page` that starts with `heading` (ValueError if none or several)."""
    found = [h for h in _headings(REPO / page) if h.startswith(heading)]
    if len(found) != 1:
        raise ValueError(f"{page}: {len(found)} headings start with {heading!r}: {found}")
    return found[0]


def code_block(page: str, heading: str, index: int = 0) -> str:
    """The `index`-th ```python block under the heading of `page` (a path from the repository root)
    that starts with `heading`. Tests that run documentation blocks read them with this call, and
    `test_every_python_block_is_run_or_says_why_not` finds those calls in tests/*.py."""
    section = _section(page, heading)
    blocks = [b for b in _blocks(REPO / page) if b["lang"] == "python" and b["heading"] == section]
    assert index < len(blocks), f"{page} § {section}: no python block {index}"
    assert blocks[index]["reason"] is None, f"{page} § {section}: block {index} is marked not run"
    return blocks[index]["code"]


def run_block(page: str, heading: str, scope: dict | None = None, index: int = 0) -> dict:
    scope = {} if scope is None else scope
    exec(compile(code_block(page, heading, index), f"{page}#{heading}", "exec"), scope)
    return scope


# --- every python block is run or says why not -------------------------------------------------

READ_BY_TESTS = re.compile(r"""(?:code_block|run_block)\(\s*"([^"]+)",\s*"([^"]+)"(?:,\s*(?:scope=)?[^,)]*?)?(?:,\s*(?:index=)?(\d+))?\s*\)""")


def _blocks_read_by_tests() -> set[tuple[str, str, int]]:
    read = set()
    for path in sorted((REPO / "tests").glob("*.py")):
        for page, heading, index in READ_BY_TESTS.findall(path.read_text()):
            read.add((page, _section(page, heading), int(index or 0)))
    return read


def test_every_python_block_is_run_or_says_why_not():
    read = _blocks_read_by_tests()
    assert ("README.md", "Quick start", 0) in read  # the finder itself works
    untested, contradicted = [], []
    for page in PAGES:
        rel = page.relative_to(REPO).as_posix()
        for block in _blocks(page):
            if block["lang"] != "python":
                continue
            where = f"{rel} § {block['heading']} (python block {block['index']})"
            is_read = (rel, block["heading"], block["index"]) in read
            if block["reason"] is None and not is_read:
                untested.append(where)
            if block["reason"] is not None and is_read:
                contradicted.append(where)
    assert not untested, ("python blocks that no test runs; run one with tests.test_docs.code_block(page, heading) "
                          "or put `<!-- not run: reason -->` on the line before it: " + "; ".join(untested))
    assert not contradicted, "marked not run but read by a test: " + "; ".join(contradicted)


def test_every_block_a_test_reads_exists():
    for page, heading, index in _blocks_read_by_tests():
        assert code_block(page, heading, index).strip()


# --- links -------------------------------------------------------------------------------------

def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _links(page: Path):
    in_fence = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        yield from re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line))


def test_every_relative_link_points_at_a_file_and_heading_that_exist():
    broken, count = [], 0
    for page in LINKED:
        for target in _links(page):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            count += 1
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in {_slug(h) for h in _headings(file)}:
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert count > 30  # the pages do link to each other
    assert not broken, "broken links: " + "; ".join(broken)


def test_the_link_check_sees_a_broken_link_and_a_broken_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [bad](#nothing) [gone](missing.md)\n```python\n[x](inside-code.md)\n```\n")
    assert list(_links(page)) == ["#title", "#nothing", "missing.md"]
    assert {_slug(h) for h in _headings(page)} == {"title"}
    assert _slug("What svft-jax refuses, and why") == "what-svft-jax-refuses-and-why"


# --- API tables against the code ---------------------------------------------------------------

def _split_arguments(text: str) -> list[str]:
    """Split an argument list at top-level commas (brackets and quotes nest)."""
    parts, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def _api_rows(page: Path) -> list[tuple[str, str]]:
    """(dotted name, argument text) of every call in the first column of the `call` tables."""
    rows, in_table = [], False
    for line in page.read_text().splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if cells[0] == "call":
            in_table = True
            continue
        if not in_table or set(cells[0]) <= set("-: "):
            continue
        spans = re.findall(r"`([^`]+)`", cells[0])
        assert spans, f"{page.name}: a `call` row without a call: {line[:80]}"
        for span in spans:
            m = re.fullmatch(r"(svft_jax(?:\.\w+)+)\((.*)\)", span)
            assert m, f"{page.name}: {span!r} is not written as svft_jax.<name>(<arguments>)"
            rows.append((m.group(1), m.group(2)))
    return rows


def _resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _signature_disagreements(dotted: str, arguments: str) -> list[str]:
    """What the listed arguments get wrong about the real signature (empty when they agree)."""
    params = inspect.signature(_resolve(dotted)).parameters
    kinds = inspect.Parameter
    errors, listed, keyword_only = [], set(), False
    for token in _split_arguments(arguments):
        if token == "*":
            keyword_only = True
            continue
        stars = len(token) - len(token.lstrip("*"))
        name, _, default = token.lstrip("*").partition("=")
        listed.add(name)
        p = params.get(name)
        if p is None:
            errors.append(f"{dotted}: {token!r} is not a parameter")
            continue
        if stars == 2 and p.kind is not kinds.VAR_KEYWORD or stars == 1 and p.kind is not kinds.VAR_POSITIONAL:
            errors.append(f"{dotted}: {token!r} is {p.kind.description}")
            continue
        if stars == 1:
            keyword_only = True
            continue
        if stars == 0 and (p.kind is kinds.KEYWORD_ONLY) != keyword_only:
            errors.append(f"{dotted}: {name!r} is {p.kind.description}, listed {'after' if keyword_only else 'before'} `*`")
        if default:
            try:
                value = ast.literal_eval(default)
            except (ValueError, SyntaxError):
                errors.append(f"{dotted}: the default of {name!r}, {default}, is not a literal")
                continue
            if p.default is kinds.empty or value != p.default:
                errors.append(f"{dotted}: {name}={default} but the code says {p.default!r}")
    for name in params:
        if name not in listed:
            errors.append(f"{dotted}: parameter {name!r} is not listed")
    return errors


@pytest.mark.parametrize("page", ["README.md", "docs/api.md"])
def test_api_tables_match_the_signatures_of_the_code(page):
    rows = _api_rows(REPO / page)
    assert len(rows) >= 15
    errors = [e for dotted, arguments in rows for e in _signature_disagreements(dotted, arguments)]
    assert not errors, "\n".join(errors)


def test_the_readme_api_table_lists_the_public_verbs():
    listed = {dotted for dotted, _ in _api_rows(REPO / "README.md")}
    verbs = {"apply", "adapt", "size", "merge", "split", "combine", "trainable_mask", "optimizer", "summary",
             "count_parameters", "select_targets", "wrap", "mark_trainable", "Rule", "SVFT"}
    assert {f"svft_jax.{v}" for v in verbs} <= listed
    assert {"svft_jax.nnx.adapt", "svft_jax.checkpoint.save_adapter", "svft_jax.checkpoint.load_adapter",
            "svft_jax.models.load_pretrained"} <= listed


def test_the_signature_check_catches_drift():
    """apply's row as it was before budget, svd_batch, progress, mesh and fsdp were listed."""
    old = ("params, pattern=\"plain\", *, d, k, rank, targets, exclude, overrides, extra, seed, factor_dtype, "
           "init, svd_dtype, keep_base, svd_backend, factors")
    errors = _signature_disagreements("svft_jax.apply", old)
    assert sorted(re.findall(r"parameter '(\w+)' is not listed", "\n".join(errors))) == [
        "budget", "fsdp", "mesh", "progress", "svd_batch"]
    assert _signature_disagreements("svft_jax.apply", old + ", svd_batch, progress, budget, mesh, fsdp") == []
    assert any("'bogus' is not a parameter" in e for e in _signature_disagreements("svft_jax.merge", "adapted, bogus"))
    assert any("listed before `*`" in e for e in _signature_disagreements("svft_jax.split", "adapted, extra") +
               _signature_disagreements("svft_jax.wrap", "apply_fn, strategy, overrides, *, rules, params_argnum, "
                                                         "params_argname, strict"))
    assert any("but the code says 'plain'" in e for e in _signature_disagreements("svft_jax.apply", old.replace('"plain"', '"banded"')))
    assert any("'build_options'" in e for e in _signature_disagreements("svft_jax.adapt", "params, config_or_rules, *, targets, exclude, extra"))
    assert _split_arguments('a, b=("x", "y"), *, c') == ["a", 'b=("x", "y")', "*", "c"]


# --- the blocks this module runs ---------------------------------------------------------------

def test_linen_and_nnx_pytree_block_equals_the_base_models_at_init(capsys):
    import svft_jax

    scope = run_block("docs/models.md", "Flax linen and NNX parameter pytrees")
    base_linen = scope["mlp"].apply({"params": scope["params"]}, scope["x"])
    np.testing.assert_array_equal(scope["y"], base_linen)  # M = 0 with W0 kept: bit-exact
    np.testing.assert_array_equal(scope["y_nnx"], scope["net"](scope["x"]))
    for tree in (scope["adapted"], scope["adapted_state"]):
        assert svft_jax.count_parameters(tree)["targets"] == 2


def test_baselines_block_builds_the_nodes_it_names():
    import svft_jax

    g = np.random.default_rng(0)
    params = {"hidden": {"kernel": g.normal(size=(16, 32)).astype(np.float32)},
              "out": {"kernel": g.normal(size=(32, 8)).astype(np.float32)}}
    scope = run_block("docs/baselines.md", "Baselines", {"params": params})
    counts = svft_jax.count_parameters(scope["adapted"])  # the last line: VeRA r=256, trainable r + d1 per target
    assert counts["targets"] == 2 and counts["trainable"] == (256 + 32) + (256 + 8)
    merged = svft_jax.merge(scope["adapted"])
    np.testing.assert_allclose(merged["hidden"]["kernel"], params["hidden"]["kernel"], rtol=0, atol=0)


def test_several_devices_block_trains_with_replicated_m_over_eight_devices(capsys):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 virtual CPU devices)")
    scope = run_block("docs/training.md", "Several devices on one host")
    loss = float(scope["metrics"]["loss"])
    assert loss < 0.8 * np.log(4)  # from chance (ln 4 for 4 classes) to clearly learnt
    m = jax.tree_util.tree_leaves(scope["trainable"])[1]
    assert m.sharding.spec == jax.sharding.PartitionSpec() and len(m.sharding.device_set) == 8
    assert f"loss {loss:.3f}, M sharding P()" in capsys.readouterr().out


@needs_flax_models
def test_hugging_face_block_adapts_minilm_with_the_printed_counts(capsys):
    scope = run_block("docs/models.md", "Loading a local Hugging Face model")
    out = capsys.readouterr().out
    assert "trainable params: 69,674 || all params: 22,713,986" in out and "adapted targets: 36" in out
    assert np.isfinite(float(scope["loss"]))
    grads = jax.tree_util.tree_leaves(scope["grads"])
    assert grads and all(np.all(np.isfinite(np.asarray(g))) for g in grads)
