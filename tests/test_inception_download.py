"""The Inception weights' download, served from a loopback HTTP server started here (never the
internet): a good file lands in the cache whole and is used without a second request; a wrong hash
and a transfer cut mid-body leave nothing behind (neither the target nor a temporary file); offline
settings and missing explicit paths give one line; a damaged cached copy is refused."""

import hashlib
import http.server
import json
import threading
import warnings

import numpy as np
import pytest
import torch

from speed_fast import paths
from speed_fast.cli import main as cli_main
from speed_fast.evaluation import download
from speed_fast.evaluation.download import InceptionWeightsMissing, resolve_inception


class PoolNet(torch.nn.Module):
    """A stand-in network: uint8 RGB in, 6 features out (the call signature of inception-2015-12-05.pt)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return torch.tanh(self.conv(x.float() / 128 - 1)).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("src") / "net.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(PoolNet()).save(str(path))
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def server(payload):
    """GET /good: the file; /short: a Content-Length of the whole file, half the body, then the socket closed."""
    data, _ = payload
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data if self.path == "/good" else data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    for name in ("SPEED_FAST_INCEPTION", "SPEED_FAST_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPEED_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_the_pin_is_the_published_one():
    assert download.INCEPTION_URL.endswith("/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt")
    assert download.INCEPTION_SHA256 == "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"


def test_a_good_download_lands_whole_and_is_reused(server, payload, cache):
    base, requests = server
    data, sha = payload
    before = len(requests)
    got = resolve_inception(url=f"{base}/good", sha256=sha)
    assert got == paths.cached_inception_path() and got.read_bytes() == data
    assert leftovers(cache) == ["inception-2015-12-05.pt"]
    assert resolve_inception(url=f"{base}/good", sha256=sha) == got and len(requests) == before + 1  # no second fetch


def test_a_wrong_hash_is_refused_and_not_kept(server, cache):
    base, _ = server
    with pytest.raises(ValueError, match="expected 0{64}; the file was refused"):
        resolve_inception(url=f"{base}/good", sha256="0" * 64)
    assert leftovers(cache) == []


def test_an_interrupted_download_is_refused_and_not_kept(server, payload, cache):
    base, _ = server
    with pytest.raises(ValueError, match="interrupted") as info:
        resolve_inception(url=f"{base}/short", sha256=payload[1])
    assert "nothing was kept" in str(info.value)
    assert leftovers(cache) == []


def test_an_unreachable_server_is_one_line(payload, cache):
    with pytest.raises(ValueError, match="could not download http://127.0.0.1:9/") as info:
        resolve_inception(url="http://127.0.0.1:9/x.pt", sha256=payload[1])
    assert "\n" not in str(info.value) and leftovers(cache) == []


@pytest.mark.parametrize("name", ["SPEED_FAST_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_never_downloads_and_says_where_to_put_the_file(server, payload, cache, monkeypatch, name):
    base, requests = server
    monkeypatch.setenv(name, "1")
    before = len(requests)
    with pytest.raises(InceptionWeightsMissing, match="offline") as info:
        resolve_inception(url=f"{base}/good", sha256=payload[1])
    message = str(info.value)
    assert str(paths.cached_inception_path()) in message and "--inception" in message and "\n" not in message
    assert len(requests) == before
    # A file already in the cache is used offline.
    monkeypatch.delenv(name)
    resolve_inception(url=f"{base}/good", sha256=payload[1])
    monkeypatch.setenv(name, "true")
    assert resolve_inception(url=f"{base}/good", sha256=payload[1]) == paths.cached_inception_path()


def test_explicit_paths_are_used_as_they_are_and_never_downloaded(server, payload, tmp_path, monkeypatch):
    base, requests = server
    before = len(requests)
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"any file: explicit paths are not hash-checked")
    assert resolve_inception(mine, url=f"{base}/good", sha256=payload[1]) == mine
    monkeypatch.setenv("SPEED_FAST_INCEPTION", str(tmp_path / "absent.pt"))
    with pytest.raises(InceptionWeightsMissing, match="never downloads to an explicit path"):
        resolve_inception(url=f"{base}/good", sha256=payload[1])
    assert len(requests) == before


def test_a_damaged_cached_copy_is_refused(payload, cache):
    cache.mkdir(parents=True)
    paths.cached_inception_path().write_bytes(b"truncated")
    with pytest.raises(ValueError, match="remove it to download it again"):
        resolve_inception(url="http://127.0.0.1:9/x.pt", sha256=payload[1])


def test_eval_downloads_on_first_use(server, payload, tmp_path, capsys, monkeypatch):
    base, _ = server
    monkeypatch.setattr(download, "INCEPTION_URL", f"{base}/good")
    monkeypatch.setattr(download, "INCEPTION_SHA256", payload[1])
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "gen.npz", arr_0=rng.integers(0, 256, (12, 9, 9, 3), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (12, 9, 9, 3), dtype=np.uint8))
    argv = ["eval", "--gen", str(tmp_path / "gen.npz"), "--ref", str(tmp_path / "ref.npz"), "--features",
            "inception", "--device", "cpu", "--json"]
    assert cli_main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["network"] == str(paths.cached_inception_path()) and result["fid"] >= 0
    assert result["sfid"] is None and "layers" in result["sfid_unavailable"] and result["is"] is None
    monkeypatch.setattr(download, "INCEPTION_SHA256", "1" * 64)  # a cached copy that no longer matches the pin
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "remove it to download it again" in err and len(err.strip().splitlines()) == 1
