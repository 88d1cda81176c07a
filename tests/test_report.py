"""HTML reports: structure and escaping (parsed with the standard library's HTML parser, checked against
the catalog file read directly), the CLI's writers in real subprocesses, and the report and the API's
``/`` page in a real headless Chromium (skipped with an install hint when there is none, failing under
``SAE_DISCOVER_REQUIRE_BROWSER=1`` as in CI)."""

from __future__ import annotations

import json
import time
from html.parser import HTMLParser

import numpy as np
import pytest

from sae_discover.report import run_report, stored_report
from sae_discover.request import build_request
from tests.browser import browser_for_test
from tests.conftest import run_cli

HOSTILE = 'Revenue grew <script>alert(1)</script> and "><img src=x onerror=alert(2)> the margins'


class Page(HTMLParser):
    """What a report shows: token texts (in order, with their classes), feature rows, tags seen, the text of
    every ``dd``, and the JSON blocks."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tokens: list[tuple[str, str, int]] = []  # text, class, position
        self.rows: list[dict] = []  # data-feature and cell texts
        self.tags: list[str] = []
        self.dds: list[str] = []
        self.json_blocks: list[str] = []
        self._tok: list | None = None
        self._row: dict | None = None
        self._cell: list[str] | None = None
        self._dd: list[str] | None = None
        self._json: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "span" and "tok" in (a.get("class") or "").split():
            self._tok = ["", a["class"], int(a["data-i"])]
        elif tag == "tr" and "data-feature" in a:
            self._row = {"feature": int(a["data-feature"]), "cells": []}
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "dd":
            self._dd = []
        elif tag == "script" and a.get("type") == "application/json":
            self._json = []

    def handle_endtag(self, tag):
        if tag == "span" and self._tok is not None:
            self.tokens.append(tuple(self._tok))  # type: ignore[arg-type]
            self._tok = None
        elif tag == "td" and self._cell is not None and self._row is not None:
            self._row["cells"].append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        elif tag == "dd" and self._dd is not None:
            self.dds.append("".join(self._dd))
            self._dd = None
        elif tag == "script" and self._json is not None:
            self.json_blocks.append("".join(self._json))
            self._json = None

    def handle_data(self, data):
        for part in (self._cell, self._dd, self._json):
            if part is not None:
                part.append(data)
        if self._tok is not None:
            self._tok[0] += data


def catalog_tokens(cat, run_id: str) -> list[tuple[int, str, bool, bool, bool]]:
    """The run's tokens, read with SQL of this test's own (an oracle independent of catalog/report.py)."""
    with cat.raw() as con:
        return con.execute("SELECT t.position, coalesce(t.token, ''), t.is_generated, t.is_special, t.kept FROM tokens t "
                           "JOIN runs r USING (run_key) WHERE r.run_id = ? ORDER BY t.position", [run_id]).fetchall()


def catalog_positions(cat, run_id: str, layer: int, stream: str, feature: int) -> list[int]:
    with cat.raw() as con:
        return [p for (p,) in con.execute(
            "SELECT a.position FROM activations a JOIN runs r USING (run_key) JOIN saes s USING (sae_key) "
            "WHERE r.run_id = ? AND s.layer = ? AND s.stream = ? AND a.feature_id = ? AND a.act <> 0 ORDER BY 1",
            [run_id, layer, stream, feature]).fetchall()]


@pytest.fixture()
def hostile_run(toy_discovery):
    """A generated run of the toy model on a prompt full of markup, with spans and labels."""
    req = build_request({"model_id": "toy", "sae_id": "toy", "prompt": HOSTILE, "generate": True, "gen_tokens": 8,
                         "return_top_x": 12, "attach_examples": True, "attach_proto_labels": True,
                         "min_coverage_pct": 0.0})
    result = toy_discovery.discover(req)
    return toy_discovery.catalog, result, run_report(toy_discovery.catalog, result)


def test_report_shows_every_token_feature_and_value_and_escapes_user_text(hostile_run):
    cat, result, text = hostile_run
    page = Page(text)
    assert result["features"], "the toy run should rank some features"
    # every token of the run, in order, with its flags
    stored = catalog_tokens(cat, result["run_id"])
    assert [(p, t) for t, _, p in page.tokens] == [(p, t) for p, t, *_ in stored]
    for (_, cls, _), (_, _, generated, special, kept) in zip(page.tokens, stored, strict=True):
        assert ("gen" in cls.split()) == generated and ("special" in cls.split()) == special
        assert ("drop" in cls.split()) == (not kept)
    assert any(g for _, _, g, _, _ in stored) and any(s for _, _, _, s, _ in stored)
    # the analyzed text of the response is the tokens' text (specials left out)
    assert "".join(t for t, cls, _ in page.tokens if "special" not in cls.split()) == result["analyzed"]["text"]
    # every returned feature, in rank order, with its values as printed
    assert [r["feature"] for r in page.rows] == [f["feature_id"] for f in result["features"]]
    for row, f in zip(page.rows, result["features"], strict=True):
        assert row["cells"][:9] == [str(page.rows.index(row) + 1), str(f["feature_id"]), str(f["layer"]), f["stream"],
                                    f"{f['score']:.4g}", f"{f['scores']['mean']:.4g}",
                                    f"{100 * f['scores']['coverage']:.3g}", f"{f['scores']['max']:.4g}",
                                    "-" if f["scores"]["selectivity"] is None else f"{f['scores']['selectivity']:.4g}"]
        assert f["proto_label"] is None or row["cells"][9].startswith(f["proto_label"])
    # the JSON response, embedded whole
    data = json.loads(page.json_blocks[0])
    assert data["response"] == json.loads(json.dumps(result))
    # per feature: its positions are the catalog's nonzero positions
    for f, extra in zip(result["features"], data["features"], strict=True):
        assert extra["p"] == catalog_positions(cat, result["run_id"], f["layer"], f["stream"], f["feature_id"])
        assert extra["h"] is not None and len(extra["h"]["counts"]) == 24  # the toy registry calibrates on first use
        assert extra["h"]["zeros"] + sum(extra["h"]["counts"]) == extra["h"]["n_tokens"]
    # user text is text: the prompt shows as written, never as markup
    assert HOSTILE in page.dds
    assert "img" not in page.tags and page.tags.count("script") == 2  # the data block and the report's script
    assert "<script>alert(1)" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in text
    assert "</script" not in page.json_blocks[0] and "<" not in page.json_blocks[0]


def test_stored_report_is_the_reranked_run(hostile_run):
    cat, result, _ = hostile_run
    page = Page(stored_report(cat, result["run_id"][:8], {"score_mode": "max", "return_top_x": 3}))
    data = json.loads(page.json_blocks[0])
    assert data["response"]["score_mode"] == "max" and len(page.rows) == len(data["response"]["features"]) <= 3
    ordered = [f["score"] for f in data["response"]["features"]]  # max, normalized by the calibration max
    assert ordered == sorted(ordered, reverse=True)


def test_a_per_hook_report_ranks_within_each_hook_and_states_the_gate(toy_discovery):
    """merge_across_layers false lists the top of each (layer, stream) one hook after another: the "#"
    column is the rank within the hook (1, 2, … again at each hook), and the header says so and states
    the coverage gate."""
    result = toy_discovery.discover(build_request({"model_id": "toy", "sae_id": "toy", "text": "Shares rose 4% on Monday.",
                                                   "layers": [0, 1], "return_top_x": 3, "min_coverage_pct": 0,
                                                   "merge_across_layers": False}))
    assert result["merge_across_layers"] is False and result["min_coverage_pct"] == 0
    hooks = [(f["layer"], f["stream"]) for f in result["features"]]
    assert len(set(hooks)) == 2 and hooks == sorted(hooks)  # grouped by hook
    page = Page(run_report(toy_discovery.catalog, result))
    expected = [hooks[:i + 1].count(h) for i, h in enumerate(hooks)]
    assert [int(r["cells"][0]) for r in page.rows] == expected and expected.count(1) == 2
    assert "coverage ≥ 0 % of analyzed tokens above τ" in page.dds
    assert any(d.startswith("the top of each hook") for d in page.dds)
    merged = toy_discovery.discover(build_request({"model_id": "toy", "sae_id": "toy", "text": "Shares rose 4% on Monday.",
                                                   "layers": [0, 1], "return_top_x": 3}))
    page = Page(run_report(toy_discovery.catalog, merged))
    assert [int(r["cells"][0]) for r in page.rows] == list(range(1, len(merged["features"]) + 1))
    assert "one over all hooks" in page.dds and "coverage ≥ 0.5 % of analyzed tokens above τ" in page.dds


# -- the CLI writers (real subprocesses) ----------------------------------------------------------

def test_cli_writes_html_for_discovery_rank_report_batch_and_drift(toy_registry, tmp_path):
    db, reg = str(tmp_path / "c.duckdb"), str(toy_registry)
    common = ["--db", db, "--registry", reg]
    r = run_cli("--model", "toy", "--sae", "toy", "--prompt", HOSTILE, "--out", str(tmp_path / "r.html"),
                "--device", "cpu", *common)
    assert r.returncode == 0, r.stderr
    page = Page((tmp_path / "r.html").read_text())
    response = json.loads(page.json_blocks[0])["response"]
    assert HOSTILE in page.dds and [row["feature"] for row in page.rows] == [f["feature_id"] for f in response["features"]]
    run_id = response["run_id"]

    r = run_cli("runs", "report", run_id[:8], "--score_mode", "max", "--out", str(tmp_path / "s.html"), *common)
    assert r.returncode == 0, r.stderr
    assert json.loads(Page((tmp_path / "s.html").read_text()).json_blocks[0])["response"]["score_mode"] == "max"
    r = run_cli("runs", "rank", run_id[:8], "--format", "html", "--out", str(tmp_path / "k.html"), *common)
    assert r.returncode == 0 and (tmp_path / "k.html").read_text().startswith("<!DOCTYPE html>")
    r = run_cli("runs", "report", run_id[:8], "--out", str(tmp_path / "s.json"), *common)
    assert r.returncode == 2 and r.stderr.startswith("error: out: expected a file ending in .html")

    lines = tmp_path / "p.jsonl"
    lines.write_text(json.dumps({"id": "a", "text": "first line of text"}) + "\n"
                     + json.dumps({"id": "b<i>", "text": "second one", "score_mode": "nope"}) + "\n"
                     + json.dumps({"id": "c", "prompt": "third"}) + "\n")
    r = run_cli("--model", "toy", "--sae", "toy", "--prompts_file", str(lines), "--out",
                str(tmp_path / "batch.html"), "--device", "cpu", *common)
    assert r.returncode == 1, r.stderr  # one line failed
    batch = (tmp_path / "batch.html").read_text()
    ids = [json.loads(x)["run_id"] for x in (tmp_path / "batch.jsonl").read_text().splitlines() if "run_id" in x]
    # each section anchored by its place on the page (two lines may share a run), its run id as data
    assert len(ids) == 2 and all(f'href="#run-{n}"' in batch and f'id="run-{n}" data-run-id="{i}"' in batch
                                 for n, i in enumerate(ids))
    assert "b&lt;i&gt;: score_mode" in batch and "<i>" not in batch

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "first line of text"}) + "\n" + json.dumps({"prompt": "third"}) + "\n")
    drift = tmp_path / "drift.html"
    r = run_cli("drift", "--base", "toy", "--tuned", "toy-finance", "--sae", "toy", "--prompts_file", str(good),
                "--out", str(drift), "--device", "cpu", *common)
    assert r.returncode == 0, r.stderr
    dpage = Page(drift.read_text())
    report = json.loads(dpage.json_blocks[0])
    assert report["overall"]["n_prompts"] == 2 and "<svg" in drift.read_text()
    assert drift.read_text().count("<circle") == len(report["features"])


# -- in a real browser ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    driver = browser_for_test()
    yield driver
    driver.quit()


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def lit(driver) -> list[int]:
    return sorted(int(e) for e in driver.execute_script(
        "return Array.from(document.querySelectorAll('section.run .tok.on')).map(t => t.dataset.i)"))


def test_an_empty_report_in_chromium_is_inert(browser, hostile_run, tmp_path):
    """No feature passed the gates: the table's one row says so, and clicking it does nothing (no error)."""
    from selenium.webdriver.common.by import By

    cat, result, _ = hostile_run
    path = tmp_path / "empty.html"
    path.write_text(stored_report(cat, result["run_id"], {"min_coverage_pct": 100, "tau": 1e6}))
    browser.get_log("browser")
    browser.get(path.as_uri())
    row = browser.find_element(By.CSS_SELECTOR, "table.feats tbody tr")
    assert row.text == "no feature passed the gates"
    row.click()
    assert console_errors(browser) == []


def test_report_in_chromium_click_sort_filter_offline(browser, hostile_run, tmp_path):
    from selenium.webdriver.common.by import By

    cat, result, text = hostile_run
    path = tmp_path / "report.html"
    path.write_text(text)
    browser.get_log("browser")  # start from an empty console log
    browser.get(path.as_uri())
    features = result["features"]
    assert len(features) >= 2
    first = features[0]
    assert lit(browser) == catalog_positions(cat, result["run_id"], first["layer"], first["stream"], first["feature_id"])
    for i in (1, len(features) - 1):
        f = features[i]
        browser.find_element(By.CSS_SELECTOR, f"table.feats tbody tr[data-f='{i}']").click()
        assert lit(browser) == catalog_positions(cat, result["run_id"], f["layer"], f["stream"], f["feature_id"])
        detail = browser.find_element(By.CSS_SELECTOR, ".detail").text
        assert f"feature {f['feature_id']} · layer {f['layer']}" in detail and "P95 τ" in detail
    # sorting by max reorders the rows by the response's max, largest first (twice: smallest first)
    header = browser.find_element(By.XPATH, "//table[@class='feats']//th[text()='max']")
    header.click()

    def order() -> list[int]:
        return [int(x) for x in browser.execute_script(
            "return Array.from(document.querySelectorAll('table.feats tbody tr')).map(r => r.dataset.feature)")]
    by_max = sorted(features, key=lambda f: -f["scores"]["max"])
    assert [f["scores"]["max"] for f in features if f["feature_id"] in order()]  # rows present
    assert [next(f for f in features if f["feature_id"] == x)["scores"]["max"] for x in order()] == \
        [f["scores"]["max"] for f in by_max]
    assert order() != [f["feature_id"] for f in features] or [f["scores"]["max"] for f in features] == \
        [f["scores"]["max"] for f in by_max]
    header.click()
    assert [next(f for f in features if f["feature_id"] == x)["scores"]["max"] for x in order()] == \
        [f["scores"]["max"] for f in reversed(by_max)]
    # filtering by a feature id leaves the rows that mention it
    target = str(features[1]["feature_id"])
    box = browser.find_element(By.CSS_SELECTOR, "input.filter")
    box.send_keys(target)
    shown = browser.execute_script("return Array.from(document.querySelectorAll('table.feats tbody tr'))"
                                   ".filter(r => r.style.display !== 'none').map(r => r.textContent)")
    assert shown and all(target in s for s in shown) and len(shown) < len(features) + 1
    # hovering a token lists features
    tok = browser.find_element(By.CSS_SELECTOR, f".tok[data-i='{lit(browser)[0] if lit(browser) else 0}']")
    from selenium.webdriver import ActionChains

    ActionChains(browser).move_to_element(tok).perform()
    assert browser.find_element(By.ID, "tip").text.startswith("token ")
    # with the pointer at the window's bottom-right corner the tooltip opens above and left of it: on screen
    rect = browser.execute_script(
        "arguments[0].dispatchEvent(new MouseEvent('mouseover', {bubbles: true, clientX: innerWidth - 4, "
        "clientY: innerHeight - 4})); var r = document.getElementById('tip').getBoundingClientRect(); "
        "return [r.left, r.top, r.right, r.bottom, innerWidth, innerHeight, r.height]", tok)
    assert rect[6] > 0 and rect[0] >= 0 and rect[1] >= 0 and rect[2] <= rect[4] and rect[3] <= rect[5], rect
    # the markup in the prompt stayed text; nothing was fetched; the console is clean
    assert browser.execute_script("return document.querySelectorAll('img').length") == 0
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert console_errors(browser) == []


def test_api_ui_lists_runs_opens_reports_and_runs_a_discovery(browser, toy_registry, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from tests.test_api import Server

    srv = Server(tmp_path / "served.duckdb", toy_registry, tmp_path / "server.log")
    try:
        made = srv.client.post("/v1/sae/features/discover", json={"model_id": "toy", "sae_id": "toy", "text": HOSTILE})
        assert made.status_code == 200, made.text
        run_id = made.json()["run_id"]
        r = srv.client.get(f"/v1/runs/{run_id[:8]}/report", params={"score_mode": "max"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert json.loads(Page(r.text).json_blocks[0])["response"]["score_mode"] == "max"
        assert "<img src=x" not in r.text
        # a list option, comma-separated as the route's OpenAPI parameters state it
        ids = [f["feature_id"] for f in made.json()["features"][:2]]
        r = srv.client.get(f"/v1/runs/{run_id[:8]}/report", params={"restrict_features": ",".join(map(str, ids))})
        assert r.status_code == 200, r.text
        assert {f["feature_id"] for f in json.loads(Page(r.text).json_blocks[0])["response"]["features"]} == set(ids)
        unfiltered = srv.client.get(f"/v1/runs/{run_id[:8]}/report", params={"restrict_features": ""})  # as JSON's []
        plain = srv.client.get(f"/v1/runs/{run_id[:8]}/report")
        assert unfiltered.status_code == plain.status_code == 200, unfiltered.text
        assert len(json.loads(Page(plain.text).json_blocks[0])["response"]["features"]) >= len(ids)
        assert json.loads(Page(unfiltered.text).json_blocks[0])["response"]["features"] == \
            json.loads(Page(plain.text).json_blocks[0])["response"]["features"]
        over = srv.client.get(f"/v1/runs/{run_id[:8]}/report", params={"return_top_x": "51"})  # this server's limit
        assert over.status_code == 400 and over.json()["detail"].startswith("return_top_x: expected an integer in [1, 50]")
        bad = srv.client.get(f"/v1/runs/{run_id[:8]}/report", params={"tau": "-1"})
        assert bad.status_code == 400 and bad.json()["field"] == "tau"
        assert srv.client.get("/v1/runs/abcdef01/report").status_code == 404

        browser.get_log("browser")
        browser.get(srv.url + "/")
        link = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "a.open"))[0]
        assert link.text == run_id[:12]
        assert HOSTILE[:40] in browser.find_element(By.ID, "runs-body").text
        link.click()
        _wait(lambda: "/report" in browser.current_url and browser.find_elements(By.CSS_SELECTOR, "section.run"))
        assert browser.execute_script("return document.querySelectorAll('img').length") == 0
        # the discovery form: a new run, then its report
        browser.get(srv.url + "/")
        _wait(lambda: len(Select(browser.find_element(By.ID, "d-model_id")).options) > 1)
        Select(browser.find_element(By.ID, "d-model_id")).select_by_value("toy")
        Select(browser.find_element(By.ID, "d-sae_id")).select_by_value("toy")
        modes = Select(browser.find_element(By.ID, "d-score_mode"))
        assert modes.first_selected_option.get_attribute("value") == "mean×coverage"  # the request's default
        assert "attribution" not in [o.get_attribute("value") for o in modes.options]  # the form has no target
        # a refused run-list filter shows the server's reason
        browser.find_element(By.ID, "f-model_id").send_keys("m" * 300)
        browser.find_element(By.CSS_SELECTOR, "#filter button").click()
        _wait(lambda: browser.find_element(By.ID, "runs-count").text.startswith("error: model_id"))
        browser.get_log("browser")  # that 400 is logged as a failed request: expected here
        Select(browser.find_element(By.ID, "d-score_mode")).select_by_value("max")
        browser.find_element(By.ID, "d-input").send_keys("The quarterly revenue grew")
        browser.find_element(By.CSS_SELECTOR, "#discover button").click()
        _wait(lambda: "/report" in browser.current_url and browser.find_elements(By.CSS_SELECTOR, "section.run"), 120)
        data = json.loads(browser.find_element(By.CSS_SELECTOR, "script.data").get_attribute("textContent"))
        assert data["response"]["score_mode"] == "max" and data["response"]["analyzed"]["text"].endswith("revenue grew")
        origins = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert all(u.startswith(srv.url + "/") for u in origins)
        assert console_errors(browser) == []
    finally:
        srv.stop()


def _wait(check, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("the page did not get there in time")


# -- decoder tokens: promoted and suppressed (lite labels) ----------------------------------------

def decoder_oracle(toy_demo, layer: int, stream: str, top: int = 5) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Per feature, the tokens its decoder row promotes and suppresses most through the toy model's
    unembedding (tied to its input embedding), from the weight files read here, in float64."""
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    hook = f"blocks.{layer}.hook_{stream}"
    w_dec = load_file(str(toy_demo / "saes" / hook / "sae_weights.safetensors"))["W_dec"].astype(np.float64)
    w_u = load_file(str(toy_demo / "model" / "model.safetensors"))["transformer.wte.weight"].astype(np.float64)
    tok = AutoTokenizer.from_pretrained(str(toy_demo / "model"))
    logits = w_dec @ w_u.T  # [d_sae, vocab]

    def shown(ids) -> list[str]:  # the lite label leaves out tokens that decode to nothing but U+FFFD
        return [t for t in (tok.decode([int(i)]) for i in ids) if t.strip("\ufffd")]
    order = np.argsort(logits, axis=1, kind="stable")
    return ({f: shown(order[f, ::-1][:top]) for f in range(len(logits))},
            {f: shown(order[f, :top]) for f in range(len(logits))})


def test_lite_labels_and_report_show_the_tokens_the_decoder_promotes_and_suppresses(attributed_run, toy_demo):
    cat, result, text = attributed_run
    promotes, suppresses = decoder_oracle(toy_demo, 1, "resid_pre")
    with cat.raw() as con:
        lite = dict(con.execute("SELECT feature_id, label FROM v_labels WHERE source = 'lite' AND layer = 1 "
                                "AND stream = 'resid_pre'").fetchall())
    assert len(lite) == len(promotes)  # every feature of the SAE has decoder tokens

    def listed(tokens: list[str]) -> str:
        return ", ".join(json.dumps(t, ensure_ascii=False) for t in tokens)
    for f, label in lite.items():  # a part with no token left (all U+FFFD) is left out
        decoder = "; ".join(f"{verb} {listed(tokens)}" for verb, tokens in
                            (("promotes", promotes[f]), ("suppresses", suppresses[f])) if tokens)
        assert decoder and label.endswith(decoder), (f, label)
    assert sum("; suppresses " in label for label in lite.values()) > len(lite) / 2
    # the report's data and the selected feature's panel carry both lists, read back from the lite label
    data = json.loads(Page(text).json_blocks[0])
    for f, extra in zip(result["features"], data["features"], strict=True):
        assert f["layer"] == 1 and f["stream"] == "resid_pre"
        assert (extra["d"], extra["s"]) == (promotes[f["feature_id"]], suppresses[f["feature_id"]])


def test_lite_parts_reads_tokens_that_look_like_its_own_syntax():
    from catalog.report import lite_parts

    label = 'fires on " promotes x", "; suppresses \\"a\\"", ", "; promotes "b"; suppresses " c", "d"'
    assert lite_parts(label) == {"fires on": [" promotes x", '; suppresses "a"', ", "], "promotes": ["b"],
                                 "suppresses": [" c", "d"]}
    assert lite_parts('fires on "a"; promotes "b"') == {"fires on": ["a"], "promotes": ["b"]}  # labels made before
    assert lite_parts("a label imported from elsewhere") == {}


# -- attribution: a real run with attribution_target=next_tokens ----------------------------------

@pytest.fixture()
def attributed_run(toy_discovery):
    req = build_request({"model_id": "toy", "sae_id": "toy", "text": "Revenue rose because the margins grew and the "
                         "quarter closed", "layers": [1], "attribution_target": "next_tokens", "return_top_x": 12,
                         "min_coverage_pct": 0.0, "attach_proto_labels": True})
    result = toy_discovery.discover(req)
    return toy_discovery.catalog, result, run_report(toy_discovery.catalog, result)


def catalog_attr(cat, run_id: str, layer: int, stream: str, feature: int) -> list[tuple[int, float, float | None]]:
    """(position, act, attr) of one feature in a run, from the public view ``v_activations`` (this test's SQL)."""
    with cat.raw() as con:
        return con.execute("SELECT position, act, attr FROM v_activations WHERE run_id = ? AND layer = ? AND stream = ? "
                           "AND feature_id = ? ORDER BY position", [run_id, layer, stream, feature]).fetchall()


def test_report_of_an_attribution_run_shows_each_tokens_attribution(attributed_run):
    cat, result, text = attributed_run
    page = Page(text)
    feats = result["features"]
    assert len(feats) >= 3 and all("attribution" in f["scores"] for f in feats)
    # the attribution column: each feature's Σ attr over the run, as v_activations holds it
    heads = column_heads(text)
    assert heads[9] == "attribution" and heads[-1] == "label"
    for row, f in zip(page.rows, feats, strict=True):
        stored = catalog_attr(cat, result["run_id"], f["layer"], f["stream"], f["feature_id"])
        assert float(row["cells"][9]) == pytest.approx(sum(a for _, _, a in stored if a is not None), abs=6e-5)
        assert row["cells"][9] == f"{f['scores']['attribution']:.4g}"
    # the heatmap data: per position, the stored attr (four significant digits)
    data = json.loads(page.json_blocks[0])
    nonzero = 0
    for f, extra in zip(feats, data["features"], strict=True):
        stored = catalog_attr(cat, result["run_id"], f["layer"], f["stream"], f["feature_id"])
        assert extra["p"] == [p for p, _, _ in stored]
        assert extra["t"] == pytest.approx([a for _, _, a in stored], rel=6e-4, abs=1e-12)
        nonzero += sum(1 for _, _, a in stored if a)
    assert nonzero > 0
    # the toggle: activation (checked) or attribution
    assert 'value=act checked' in text and 'value=attr>' in text


def column_heads(text: str) -> list[str]:
    """The feature table's column headings."""
    class Heads(HTMLParser):
        def __init__(self):
            super().__init__()
            self.heads, self._in = [], False

        def handle_starttag(self, tag, attrs):
            self._in = tag == "th" and any(k == "data-k" for k, _ in attrs)
            if self._in:
                self.heads.append("")

        def handle_endtag(self, tag):
            self._in = False if tag == "th" else self._in

        def handle_data(self, data):
            if self._in:
                self.heads[-1] += data
    p = Heads()
    p.feed(text)
    return p.heads


def token_colours(driver) -> dict[int, tuple[tuple[int, int, int], float]]:
    """Position → (rgb, alpha) of every highlighted token, as the browser computed it."""
    out = {}
    for pos, colour in driver.execute_script(
            "return Array.from(document.querySelectorAll('section.run .tok.on'))"
            ".map(t => [Number(t.dataset.i), getComputedStyle(t).backgroundColor])"):
        parts = [float(x) for x in colour[colour.index("(") + 1:-1].split(",")]
        out[pos] = (tuple(int(x) for x in parts[:3]), parts[3] if len(parts) == 4 else 1.0)
    return out


def expected_colours(values: dict[int, float]) -> dict[int, tuple[tuple[int, int, int], float]]:
    """The heatmap's rule: orange for positive, blue for negative, opacity 0.12 + 0.78 |v| / max |v|."""
    scale = max(abs(v) for v in values.values())
    return {p: ((40, 110, 230) if v < 0 else (255, 112, 0), 0.12 + 0.78 * abs(v) / scale) for p, v in values.items()}


def assert_colours(seen, expected):
    assert sorted(seen) == sorted(expected)
    for p in expected:
        assert seen[p][0] == expected[p][0] and seen[p][1] == pytest.approx(expected[p][1], abs=0.01), p


def test_attribution_toggle_in_chromium_colours_tokens_by_the_runs_attr(browser, attributed_run, tmp_path):
    from selenium.webdriver import ActionChains
    from selenium.webdriver.common.by import By

    cat, result, text = attributed_run
    path = tmp_path / "attr.html"
    path.write_text(text)
    browser.get_log("browser")
    browser.get(path.as_uri())
    feats = result["features"]
    stored = [catalog_attr(cat, result["run_id"], f["layer"], f["stream"], f["feature_id"]) for f in feats]
    # another feature whose attributions at its tokens have both signs, to see both colours
    mixed = next(i for i, s in enumerate(stored) if i > 0 and {a > 0 for _, _, a in s if a} == {True, False})
    acts = {p: act for p, act, _ in stored[0]}
    assert_colours(token_colours(browser), expected_colours(acts))  # by activation at first

    browser.find_element(By.CSS_SELECTOR, "input[name^=color][value=attr]").click()
    assert_colours(token_colours(browser), expected_colours({p: a or 0.0 for p, _, a in stored[0]}))
    browser.find_element(By.CSS_SELECTOR, f"table.feats tbody tr[data-f='{mixed}']").click()
    attrs = {p: a or 0.0 for p, _, a in stored[mixed]}
    assert_colours(token_colours(browser), expected_colours(attrs))
    # hovering a token lists the selected feature with its activation and attribution there
    pos = max(attrs, key=lambda p: abs(attrs[p]))
    ActionChains(browser).move_to_element(browser.find_element(By.CSS_SELECTOR, f".tok[data-i='{pos}']")).perform()
    f = feats[mixed]
    line = next(x for x in browser.find_element(By.ID, "tip").text.splitlines() if x.startswith(f"#{f['feature_id']} L"))
    assert float(line.split("attr ")[1]) == pytest.approx(attrs[pos], abs=1e-4)
    # back to activations
    browser.find_element(By.CSS_SELECTOR, "input[name^=color][value=act]").click()
    assert_colours(token_colours(browser), expected_colours({p: act for p, act, _ in stored[mixed]}))
    # sorting by the attribution column orders the rows by the run's Σ attr, largest first
    browser.find_element(By.XPATH, "//table[@class='feats']//th[text()='attribution']").click()
    order = [int(x) for x in browser.execute_script(
        "return Array.from(document.querySelectorAll('table.feats tbody tr')).map(r => r.dataset.feature)")]
    sums = {f["feature_id"]: sum(a or 0.0 for _, _, a in s) for f, s in zip(feats, stored, strict=True)}
    assert [sums[x] for x in order] == pytest.approx(sorted(sums.values(), reverse=True), abs=1e-6)
    # the panel lists the decoder's suppressed tokens beside the promoted ones
    data = json.loads(browser.find_element(By.CSS_SELECTOR, "script.data").get_attribute("textContent"))
    chips = browser.execute_script("return Array.from(document.querySelectorAll('.detail .chips.suppresses span'))"
                                   ".map(s => s.textContent)")
    assert chips == data["features"][mixed]["s"] and chips
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert console_errors(browser) == []


def test_a_verified_run_shows_its_ablation_deltas_and_summary(toy_discovery):
    """verify_top: the ablate Δ column holds each verified feature's measured change (blank for the
    others), and the header says what M was and how the ablations bore the attributions out."""
    from sae_discover.output import verification_lines

    result = toy_discovery.discover(build_request({
        "model_id": "toy", "sae_id": "toy", "text": "Revenue rose because the margins grew and the quarter closed",
        "layers": [1], "attribution_target": "next_tokens", "score_mode": "attribution_abs", "verify_top": 2,
        "min_coverage_pct": 0.0, "return_top_x": 6}))
    text = run_report(toy_discovery.catalog, result)
    page = Page(text)
    heads = column_heads(text)
    assert heads[9:11] == ["attribution", "ablate Δ"]
    for row, f in zip(page.rows, result["features"], strict=True):
        assert row["cells"][10] == (f"{f['ablation_delta']:.4g}" if "ablation_delta" in f else "-")
    assert sum("ablation_delta" in f for f in result["features"]) == 2
    assert verification_lines(result["verification"])[0] in page.dds
