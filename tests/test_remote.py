"""Cloud-native inputs: a COG served over HTTP by a local server on 127.0.0.1 (started and stopped here), and a
STAC item pointing at it. Detection gives the same output as on the local file, reading with range requests
(block-aligned, no whole-file download)."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from click.testing import CliRunner

from geonet.cli.main import cli
from geonet.detect import DetectConfig, detect
from geonet.errors import InputError
from geonet.raster import describe_raster, find_rasters
from geonet.remote import RemoteRaster, stac_asset_href
from test_detect import make_ckpt, scene


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.requests: list[tuple[str, str, str | None, int]] = []  # method, path, Range header, bytes sent
        self.lock = threading.Lock()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def bytes_sent(self, name):
        return sum(n for _, p, _, n in self.requests if p.endswith(name))


class _Handler(BaseHTTPRequestHandler):
    """Static files with HEAD, GET and single ``Range: bytes=a-b`` requests (what GDAL's /vsicurl/ sends)."""

    def log_message(self, *args):
        pass

    def _send(self, body_too):
        path = self.server.root / self.path.lstrip("/").split("?")[0]
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m:
            a = int(m.group(1))
            b = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
            part = data[a:b + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{b}/{len(data)}")
        else:
            part = data
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(part)))
        self.end_headers()
        sent = 0
        if body_too:
            self.wfile.write(part)
            sent = len(part)
        with self.server.lock:
            self.server.requests.append((self.command, self.path, rng, sent))

    def do_HEAD(self):
        self._send(False)

    def do_GET(self):
        self._send(True)


@pytest.fixture()
def served(tmp_path):
    """A 700 x 560 px uint16 COG (GDAL's COG driver: 64 px blocks, deflate, overviews) with objects, served over
    HTTP."""
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 500, size=(12, 2))
    local = scene(tmp_path, np.concatenate([xy, xy + rng.uniform(12, 35, size=(12, 2))], axis=1), 700, 560,
                  name="plain.tif")
    cog = tmp_path / "scene.tif"
    rasterio.shutil.copy(local, cog, driver="COG", blocksize=128, compress="deflate")
    srv = _Server(tmp_path)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield tmp_path, cog, srv
    srv.shutdown()
    srv.server_close()


def test_url_scene_detects_as_the_local_file_with_range_reads(served, tmp_path):
    root, cog, srv = served
    ck = make_ckpt(tmp_path / "m.pt", busy=True)
    cfg = dict(model=str(ck), amp="32", score_thresh=0.3, workers=1)
    ref = detect([str(cog)], tmp_path / "local.geojson", DetectConfig(**cfg), show_progress=False)
    url = f"{srv.url}/scene.tif"
    info = describe_raster(url)
    header_bytes = srv.bytes_sent("scene.tif")
    size = cog.stat().st_size
    assert (info.width, info.height, info.tiled, info.block_shape) == (700, 560, True, (128, 128))
    assert header_bytes < size / 2, (header_bytes, size)  # the header, not the file
    rep = detect([url], tmp_path / "remote.geojson", DetectConfig(**cfg), show_progress=False)
    assert rep.ok and rep.scenes[0].detections == ref.scenes[0].detections > 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("local.geojson", "remote.geojson"))
    assert [f["geometry"] for f in a["features"]] == [f["geometry"] for f in b["features"]]
    assert [f["properties"]["score"] for f in a["features"]] == [f["properties"]["score"] for f in b["features"]]
    assert b["geonet"]["scene"] == url
    gets = [r for r in srv.requests if r[0] == "GET"]
    assert gets and all(r[2] is not None for r in gets), "a GET without Range: a whole-file download"
    total = srv.bytes_sent("scene.tif")
    print(f"COG of {size} bytes: header {header_bytes} bytes, whole detection {total} bytes in {len(gets)} range "
          f"requests ({total / size:.2f}x the file)")
    assert total < 1.1 * size  # each block fetched once (block-aligned reads, GDAL block cache); no overviews


def test_stac_item_selects_its_asset(served, tmp_path):
    root, cog, srv = served
    item = {
        "type": "Feature", "stac_version": "1.0.0", "id": "scene-1", "properties": {"datetime": "2024-05-01T00:00:00Z"},
        "geometry": None, "links": [],
        "assets": {"visual": {"href": f"{srv.url}/scene.tif", "type": "image/tiff; application=geotiff; "
                                                                       "profile=cloud-optimized"},
                   "thumbnail": {"href": "thumb.png", "type": "image/png"},
                   "local": {"href": "./scene.tif", "type": "image/tiff; application=geotiff"}},
    }
    (root / "item.json").write_text(json.dumps(item))
    assert find_rasters([str(root / "item.json")]) == [RemoteRaster(f"{srv.url}/scene.tif")]
    # relative hrefs resolve against the item's location; the item itself may be a URL
    assert str(find_rasters([str(root / "item.json")], asset="local")[0]) == str(cog)
    assert stac_asset_href(f"{srv.url}/item.json", "visual") == f"{srv.url}/scene.tif"
    with pytest.raises(InputError, match=r"no such asset; it has \['visual', 'thumbnail', 'local'\]"):
        find_rasters([str(root / "item.json")], asset="B04")
    ck = make_ckpt(tmp_path / "m.pt", busy=True)
    res = CliRunner().invoke(cli, ["detect", f"{srv.url}/item.json", "--asset", "visual", "-m", str(ck),
                                   "-o", str(tmp_path / "o.geojson"), "--score-thresh", "0.3"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o.geojson").read_text())["geonet"]["scene"] == f"{srv.url}/scene.tif"


def test_unreachable_url_is_one_line_input_error(served, tmp_path):
    root, cog, srv = served
    ck = make_ckpt(tmp_path / "m.pt", busy=True)
    res = CliRunner().invoke(cli, ["detect", f"{srv.url}/missing.tif", "-m", str(ck), "-o", str(tmp_path / "o.geojson")])
    assert res.exit_code == 2, res.output
    assert "missing.tif" in res.output and "cannot be read over the network" in res.output
    assert "Fix:" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o.geojson").exists()
    bad = root / "bad.json"
    bad.write_text('{"type": "FeatureCollection", "features": []}')
    res = CliRunner().invoke(cli, ["detect", str(bad), "-m", str(ck), "-o", str(tmp_path / "o.geojson")])
    assert res.exit_code == 2 and "not a readable STAC item" in res.output and "Traceback" not in res.output
