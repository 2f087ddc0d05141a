"""The Hub path with the real huggingface_hub client against a local server (tests/hf_server.py):
only the needed shards are downloaded, the cache is used the second time, offline mode and
revisions work, and a plan downloads nothing but config and index."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
from conftest import tiny_config
from hf_server import HubServer, commit_of
from test_loader import assert_same_forward, assert_same_params, make

from mtp.export import write_checkpoint
from mtp.loader import download, load_model, plan
from mtp.testing import write_release_like

REPO = "org/tiny"
INDEX = "model.safetensors.index.json"
SHARD = "model-{:05d}-of-00005.safetensors".format
CFG = tiny_config(num_hidden_layers=3)  # 3 main-model layers: shards 1 and 2 and 3 hold them
NEEDED = ["config.json", INDEX, SHARD(1), SHARD(4), SHARD(5)]  # embed, head, mtp.0


@pytest.fixture
def hub(tmp_path, monkeypatch):
    folders = {}
    for revision, seed in (("main", 0), ("v1", 1)):
        folders[revision] = str(tmp_path / "served" / revision)
        write_release_like(make(CFG, seed=seed), folders[revision], num_shards=5, main_layers=3)
    single = str(tmp_path / "served" / "single")
    write_checkpoint(make(CFG), single, layout="single")
    with HubServer({REPO: folders, "org/single": {"main": single}}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        server.cache = str(tmp_path / "cache")
        yield server


def test_downloads_only_the_needed_shards_then_uses_the_cache(hub):
    model, report = load_model(REPO, cache_dir=hub.cache, dtype=torch.float32)
    assert Counter(hub.gets()) == Counter(NEEDED)  # each once; shards 2 and 3 never
    assert report.shards_skipped == [SHARD(2), SHARD(3)]
    assert_same_params(make(CFG), model)
    assert_same_forward(make(CFG), model)
    hub.clear()
    again, _ = load_model(REPO, cache_dir=hub.cache, dtype=torch.float32)
    assert hub.gets() == []  # only a HEAD of config.json to resolve "main"
    assert [(m, f) for m, _, _, f in hub.requests] == [("HEAD", "config.json")]
    assert_same_params(model, again)


def test_offline_mode_uses_the_cache_and_never_the_network(hub, monkeypatch):
    load_model(REPO, cache_dir=hub.cache, dtype=torch.float32)
    hub.clear()
    model, _ = load_model(REPO, cache_dir=hub.cache, dtype=torch.float32, local_files_only=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again, _ = load_model(REPO, cache_dir=hub.cache, dtype=torch.float32)
    assert hub.requests == []
    assert_same_params(make(CFG), model)
    assert_same_params(make(CFG), again)
    with pytest.raises(FileNotFoundError, match="offline mode is on"):
        load_model(REPO, cache_dir=hub.cache + "-empty")


def test_revision(hub):
    model, _ = load_model(REPO, revision="v1", cache_dir=hub.cache, dtype=torch.float32)
    assert_same_params(make(CFG, seed=1), model)
    revisions = {rev for _, _, rev, _ in hub.requests}
    assert revisions == {"v1", commit_of(REPO, "v1")}  # then pinned to v1's commit
    with pytest.raises(FileNotFoundError, match="no revision 'v2'"):
        load_model(REPO, revision="v2", cache_dir=hub.cache)


def test_plan_reads_only_config_and_index(hub):
    p = plan(REPO, cache_dir=hub.cache)
    assert hub.gets() == ["config.json", INDEX]
    assert p.ok and p.shards_read == [SHARD(1), SHARD(4), SHARD(5)]
    assert p.bytes is None and p.weight_format is None  # shard headers not downloaded
    p = plan(REPO, cache_dir=hub.cache, embed_tokens_given=True, head_given=True)
    assert p.shards_read == [SHARD(5)]


def test_download(hub):
    folder = download(REPO, cache_dir=hub.cache, progress=False)
    assert sorted(os.listdir(folder)) == sorted(NEEDED)
    assert os.path.basename(folder) == commit_of(REPO, "main")
    hub.clear()
    model, _ = load_model(folder, dtype=torch.float32)  # the folder loads as it is
    assert hub.requests == []
    assert_same_params(make(CFG), model)
    only_mtp = download(REPO, cache_dir=hub.cache + "-2", embed_tokens_given=True,
                        head_given=True)
    assert sorted(os.listdir(only_mtp)) == sorted(["config.json", INDEX, SHARD(5)])


def test_single_file_repo(hub):
    model, _ = load_model("org/single", cache_dir=hub.cache, dtype=torch.float32)
    assert hub.gets() == ["config.json", "model.safetensors"]
    assert_same_params(make(CFG), model)


def test_token_is_sent(hub):
    load_model(REPO, cache_dir=hub.cache, token="hf_secret", dtype=torch.float32)
    assert hub.auth and set(hub.auth) == {"Bearer hf_secret"}


def test_unknown_repo(hub):
    with pytest.raises(FileNotFoundError, match="no Hub repo 'org/absent'"):
        load_model("org/absent", cache_dir=hub.cache)


# ---- revisions, paths that are not repo ids, and failures as one line ---------------------
@pytest.mark.parametrize("revision", ["refs/../../..", "../x", "/etc/passwd", "a\\b", "v1\n",
                                      "main\x00", "a b", "x.lock", "-x", "refs//x", "@{1}"])
def test_bad_revisions_are_refused_before_any_request(hub, revision):
    with pytest.raises(ValueError, match=r"revision=.* is not a branch, tag or commit name"):
        load_model(REPO, revision=revision, cache_dir=hub.cache)
    assert hub.requests == []


@pytest.mark.parametrize("where", ["models/DeepSeek-V4-Flash", "./x", "../x/y", "~/no-such-x/y",
                                   "/no/such/folder"])
def test_a_missing_local_path_is_not_sent_to_the_hub(hub, tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # so models/... reads as a local path
    with pytest.raises(FileNotFoundError, match=r"is neither a folder nor a Hub repo id: it reads "
                                                r"as a local path .* no such folder exists"):
        load_model(where, cache_dir=hub.cache)
    assert hub.requests == []


def test_a_file_is_not_a_checkpoint_folder(hub, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="is a file, not a checkpoint folder"):
        load_model(str(tmp_path / "config.json"))


def test_hub_failures_are_one_line_without_retry_noise(tmp_path, monkeypatch, capfd, caplog):
    import huggingface_hub.utils._http as hf_http

    monkeypatch.setattr(hf_http.time, "sleep", lambda s: None)  # its backoff, not its requests
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with HubServer({}, failing={"org/down": 503}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(FileNotFoundError) as info:
            load_model("org/down", cache_dir=str(tmp_path / "cache"))
        assert len(server.requests) > 1  # huggingface_hub did retry
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("could not fetch config.json of org/down@main from http://127.0.0.1:")
    assert "503 Service Unavailable" in message and "local_files_only=True" in message
    out, err = capfd.readouterr()
    assert "Retry" not in out + err + caplog.text and "thrown while requesting" not in err
