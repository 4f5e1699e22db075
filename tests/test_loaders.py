"""Real-dataset loaders (VOC folder, TFDS voc, COCO, ImageNet-segmentation) on tiny fixtures
written here in the real on-disk formats."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import warnings

import numpy as np
import pytest
from PIL import Image

from xaijax import data
from xaijax.data import (
    CorruptImageError,
    DatasetLayoutError,
    Record,
    SkippedImageWarning,
    boxes_to_mask,
    class_mask,
)


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth non-symmetric uint8 test image (survives JPEG well; transposes are visible)."""
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(1, 4, 3)
    img = np.stack([(xx * a * 4) % 256, (yy * b * 5) % 256, ((xx + 2 * yy) * c) % 256], -1)
    return img.astype(np.uint8)


def _expected_pixels(path: str, size: tuple[int, int] | None = None) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    if size is not None:
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(img, np.float32) / 255.0


def _voc_region(h: int, w: int, xmin: int, ymin: int, xmax: int, ymax: int) -> np.ndarray:
    """TorchRay's voc_as_mask rule, written independently: mask[ymin-1:ymax, xmin-1:xmax]."""
    m = np.zeros((h, w), bool)
    m[ymin - 1 : ymax, xmin - 1 : xmax] = True
    return m


# ============================================================================ VOC

_VOC_OBJECTS = {
    # id: (width, height, [(name, (xmin, ymin, xmax, ymax), truncated, difficult or None)])
    "000001": (60, 40, [("dog", (1, 2, 30, 40), 1, 0), ("person", (10, 5, 20, 15), 0, 1)]),
    "000002": (50, 30, [("car", (5, 6, 25, 20), 0, None), ("tvmonitor", (40, 1, 50, 30), 1, 0)]),
    "000003": (20, 20, [("cat", (2, 2, 10, 10), 0, 0)]),  # its JPEG is corrupt
}


def _voc_xml(image_id: str, w: int, h: int, objects) -> str:
    objs = []
    for name, (x0, y0, x1, y1), trunc, diff in objects:
        diff_tag = "" if diff is None else f"<difficult>{diff}</difficult>"
        objs.append(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>{trunc}</truncated>{diff_tag}"
            f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        )
    return (
        f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>"
        f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size><segmented>0</segmented>"
        + "".join(objs)
        + "</annotation>"
    )


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("voc")
    voc = base / "VOCdevkit" / "VOC2007"
    for d in ("ImageSets/Main", "Annotations", "JPEGImages"):
        (voc / d).mkdir(parents=True)
    for k, (image_id, (w, h, objects)) in enumerate(_VOC_OBJECTS.items()):
        (voc / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(image_id, w, h, objects))
        jpg = voc / "JPEGImages" / f"{image_id}.jpg"
        if image_id == "000003":
            Image.fromarray(_rgb(h, w, k)).save(jpg, quality=95)
            jpg.write_bytes(jpg.read_bytes()[:60])  # truncated: the header survives, the data does not
        else:
            Image.fromarray(_rgb(h, w, k)).save(jpg, quality=95)
    (voc / "ImageSets" / "Main" / "test.txt").write_text("000001\n000002\n000003\n")
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("000002\n")
    return str(base)


def test_voc_records_exact(voc_root):
    ds = data.open_voc(voc_root)  # default split "test"
    assert len(ds) == 3
    assert ds.class_names == data.VOC_CLASSES and len(ds.class_names) == 20
    assert ds.class_names[:3] == ("aeroplane", "bicycle", "bird") and ds.class_names[-1] == "tvmonitor"
    voc_dir = os.path.join(voc_root, "VOCdevkit", "VOC2007")
    for i, image_id in enumerate(["000001", "000002"]):
        w, h, objects = _VOC_OBJECTS[image_id]
        r = ds[i]
        assert isinstance(r, Record) and r.image_id == image_id
        np.testing.assert_array_equal(
            r.image, _expected_pixels(os.path.join(voc_dir, "JPEGImages", f"{image_id}.jpg"))
        )
        assert r.image.shape == (h, w, 3)
        np.testing.assert_array_equal(r.labels, [data.VOC_CLASSES.index(o[0]) for o in objects])
        # 1-based inclusive XML -> [xmin - 1, ymin - 1, xmax, ymax]
        np.testing.assert_array_equal(r.boxes, [[x0 - 1, y0 - 1, x1, y1] for _, (x0, y0, x1, y1), _, _ in objects])
        np.testing.assert_array_equal(r.difficult, [bool(o[3]) for o in objects])
        for k, (_, box, _, _) in enumerate(objects):
            np.testing.assert_array_equal(r.masks[k], _voc_region(h, w, *box))
        ann = ds.annotation(i)
        np.testing.assert_array_equal(ann.truncated, [bool(o[2]) for o in objects])
    r0 = ds[0]
    np.testing.assert_array_equal(r0.labels, [11, 14])  # dog, person
    np.testing.assert_array_equal(r0.boxes, [[0, 1, 30, 40], [9, 4, 20, 15]])
    np.testing.assert_array_equal(r0.difficult, [False, True])
    assert ds[1].difficult.tolist() == [False, False]  # a missing <difficult> tag reads as 0
    # any split name; VOCdevkit or VOC2007 given directly find the same data
    tv = data.open_voc(os.path.join(voc_root, "VOCdevkit"), split="trainval")
    assert len(tv) == 1 and tv[0].image_id == "000002"
    assert len(data.open_voc(voc_dir)) == 3


def test_voc_corrupt_image_skipped_and_counted(voc_root):
    ds = data.open_voc(voc_root)
    with pytest.warns(SkippedImageWarning, match="000003"):
        recs = list(ds)
    assert [r.image_id for r in recs] == ["000001", "000002"]
    assert ds.num_skipped == 1 and list(ds.skipped) == [2]
    with pytest.raises(CorruptImageError, match="000003.jpg"):
        ds[2]
    with pytest.warns(SkippedImageWarning):
        assert ds.get(-1) is None
    assert ds.num_skipped == 1  # counted once per image


def test_voc_resize_scales_boxes_and_masks(voc_root):
    native = data.open_voc(voc_root)
    ds = data.open_voc(voc_root, size=(20, 120))  # image 0 is 40 x 60: sy = 1/2, sx = 2
    r, r0 = ds[0], native[0]
    assert r.image.shape == (20, 120, 3)
    voc_dir = os.path.join(voc_root, "VOCdevkit", "VOC2007")
    np.testing.assert_allclose(
        r.image, _expected_pixels(os.path.join(voc_dir, "JPEGImages", "000001.jpg"), (20, 120)), atol=1e-6
    )
    np.testing.assert_allclose(r.boxes, [[0, 0.5, 60, 20], [18, 2, 40, 7.5]])
    for k in range(2):
        np.testing.assert_array_equal(r.masks[k], boxes_to_mask(r.boxes[k : k + 1], 20, 120))
        # the same region as sampling the native mask at the output pixel centres
        rows = ((np.arange(20) + 0.5) * 2).astype(int)
        cols = ((np.arange(120) + 0.5) / 2).astype(int)
        np.testing.assert_array_equal(r.masks[k], r0.masks[k][rows][:, cols])
    np.testing.assert_array_equal(r.labels, r0.labels)
    np.testing.assert_array_equal(r.difficult, r0.difficult)
    assert data.open_voc(voc_root, size=32)[1].image.shape == (32, 32, 3)
    with pytest.raises(ValueError, match="size"):
        data.open_voc(voc_root, size=(0, 5))


def test_voc_missing_layout_errors(voc_root, tmp_path):
    with pytest.raises(DatasetLayoutError, match="does_not_exist"):
        data.open_voc(tmp_path / "does_not_exist")
    with pytest.raises(DatasetLayoutError, match="VOC2007"):
        data.open_voc(tmp_path)  # exists, but holds no VOC2007
    with pytest.raises(DatasetLayoutError, match=r"ImageSets.Main.nosuch\.txt"):
        data.open_voc(voc_root, split="nosuch")
    broken = tmp_path / "copy"
    shutil.copytree(voc_root, broken)
    shutil.rmtree(broken / "VOCdevkit" / "VOC2007" / "JPEGImages")
    with pytest.raises(DatasetLayoutError, match="JPEGImages"):
        data.open_voc(broken)
    voc_sub = os.path.join("VOCdevkit", "VOC2007", "JPEGImages")
    shutil.copytree(os.path.join(voc_root, voc_sub), broken / voc_sub)
    os.remove(broken / "VOCdevkit" / "VOC2007" / "Annotations" / "000002.xml")
    with pytest.raises(DatasetLayoutError, match=r"000002\.xml"):
        data.open_voc(broken)
    (broken / "VOCdevkit" / "VOC2007" / "Annotations" / "000002.xml").write_text(
        _voc_xml("000002", 50, 30, [("unicorn", (1, 1, 2, 2), 0, 0)])
    )
    with pytest.raises(ValueError, match="unicorn"):
        data.open_voc(broken)


# ============================================================================ TFDS voc


def _crc32c(buf: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in buf:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked_crc(buf: bytes) -> int:
    crc = _crc32c(buf)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@pytest.fixture(scope="module")
def tfds_dirs(voc_root, tmp_path_factory):
    """A prepared TFDS voc/2007 (array_record, written by TFDS itself without TensorFlow, with
    the real VOC feature spec), and the same records re-framed as the TFRecord format."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.object_detection import voc as tfds_voc

    voc_dir = os.path.join(voc_root, "VOCdevkit", "VOC2007")

    class LocalVoc(tfds_voc.Voc, skip_registration=True):
        name = "voc"

        def _split_generators(self, dl_manager):
            return {"test": self._local_examples()}

        def _local_examples(self):
            for image_id in ("000001", "000002"):  # the valid images
                w, h, objects = _VOC_OBJECTS[image_id]
                objs = [
                    {
                        "label": name,
                        "pose": "unspecified",
                        # exactly what TFDS' voc.py stores: raw XML values / size
                        "bbox": tfds.features.BBox(y0 / h, x0 / w, y1 / h, x1 / w),
                        "is_truncated": bool(trunc),
                        "is_difficult": bool(diff),
                    }
                    for name, (x0, y0, x1, y1), trunc, diff in objects
                ]
                labels = sorted({o["label"] for o in objs})
                yield image_id, {
                    "image": os.path.join(voc_dir, "JPEGImages", f"{image_id}.jpg"),
                    "image/filename": f"{image_id}.jpg",
                    "objects": objs,
                    "labels": labels,
                    "labels_no_difficult": sorted({o["label"] for o in objs if not o["is_difficult"]}),
                }

    base = tmp_path_factory.mktemp("tfds")
    # TFDS makes a temporary folder of its own (DatasetInfo.initialize_from_bucket: mkdtemp("tfds"),
    # never removed): it goes into a private folder under this fixture's, removed below
    system_tmp = tempfile.gettempdir()
    before = set(os.listdir(system_tmp))
    private_tmp = base / "tmp"
    private_tmp.mkdir()
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("ignore")
        mp.setattr(tempfile, "tempdir", str(private_tmp))
        builder = LocalVoc(config="2007", data_dir=str(base / "ar"), file_format="array_record")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    shutil.rmtree(private_tmp)
    leaked = sorted(n for n in set(os.listdir(system_tmp)) - before if "tfds" in n)
    version_dir = os.path.join(base, "ar", "voc", "2007", "5.0.0")
    assert os.path.isfile(os.path.join(version_dir, "dataset_info.json"))

    # TFRecord copy: same serialized tf.train.Example records, TFRecord framing with masked CRC32C.
    raw = tfds.builder_from_directory(version_dir).as_data_source(
        "test", deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
    )
    tfr_dir = base / "tfr" / "voc" / "2007" / "5.0.0"
    shutil.copytree(version_dir, tfr_dir)
    for name in os.listdir(tfr_dir):
        if ".array_record-" in name:
            os.remove(tfr_dir / name)
    with open(tfr_dir / "voc-test.tfrecord-00000-of-00001", "wb") as f:
        for i in range(len(raw)):
            rec = bytes(raw[i])
            n = struct.pack("<Q", len(rec))
            f.write(n + struct.pack("<I", _masked_crc(n)) + rec + struct.pack("<I", _masked_crc(rec)))
    info = json.loads((tfr_dir / "dataset_info.json").read_text())
    info["fileFormat"] = "tfrecord"
    (tfr_dir / "dataset_info.json").write_text(json.dumps(info))
    return {"array_record": str(base / "ar"), "tfrecord": str(base / "tfr"), "leaked_tmp": leaked}


def test_tfds_fixture_leaves_no_temporary_folder(tfds_dirs):
    assert tfds_dirs["leaked_tmp"] == []


@pytest.mark.parametrize("fmt", ["array_record", "tfrecord"])
def test_voc_tfds_matches_vocdevkit(tfds_dirs, voc_root, fmt):
    ref = {r.image_id: r for r in data.open_voc(voc_root).records(0, 2)}
    ds = data.open_voc_tfds(tfds_dirs[fmt])  # data_dir -> voc/2007/<highest version>
    assert ds.file_format == fmt and len(ds) == 2 and ds.class_names == data.VOC_CLASSES
    got = {r.image_id: r for r in ds}
    assert set(got) == set(ref)
    for image_id, r in got.items():
        e = ref[image_id]
        np.testing.assert_array_equal(r.image, e.image)  # same JPEG bytes, same decoder
        np.testing.assert_array_equal(r.labels, e.labels)
        np.testing.assert_array_equal(r.boxes, e.boxes)  # exact after the float32 snap
        np.testing.assert_array_equal(r.masks, e.masks)
        np.testing.assert_array_equal(r.difficult, e.difficult)
    # resizing follows the same rule as the folder loader
    small = {r.image_id: r for r in data.open_voc_tfds(tfds_dirs[fmt], size=(20, 30))}
    ref_small = {r.image_id: r for r in data.open_voc(voc_root, size=(20, 30)).records(0, 2)}
    for image_id, r in small.items():
        np.testing.assert_array_equal(r.boxes, ref_small[image_id].boxes)
        np.testing.assert_array_equal(r.masks, ref_small[image_id].masks)


def test_voc_tfds_without_package_is_a_clear_import_error(voc_root, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        data.open_voc_tfds(voc_root)


def test_voc_tfds_errors(tfds_dirs, tmp_path):
    with pytest.raises(DatasetLayoutError, match="dataset_info.json"):
        data.open_voc_tfds(tmp_path)
    with pytest.raises(ValueError, match="validation"):
        data.open_voc_tfds(tfds_dirs["array_record"], split="validation")


# ============================================================================ COCO

_COCO_H, _COCO_W = 24, 32  # image 42


def _rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE, written independently: column-major runs, starting with zeros."""
    flat = mask.T.reshape(-1).astype(np.uint8)  # Fortran order
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return counts


def _car_mask() -> np.ndarray:
    m = np.zeros((_COCO_H, _COCO_W), bool)
    m[14:20, 2:9] = True
    m[16:18, 9:12] = True  # an L shape
    return m


def _crowd_mask() -> np.ndarray:
    m = np.zeros((_COCO_H, _COCO_W), bool)
    m[2:22, 20:30] = True
    m[5:8, 22:25] = False  # a hole
    return m


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory):
    mask_api = pytest.importorskip("pycocotools.mask")
    base = tmp_path_factory.mktemp("coco")
    img_dir = base / "val2014"
    img_dir.mkdir()
    images = [
        {"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "width": _COCO_W, "height": _COCO_H},
        {"id": 7, "file_name": "COCO_val2014_000000000007.jpg", "width": 20, "height": 16},
        {"id": 99, "file_name": "COCO_val2014_000000000099.jpg", "width": 10, "height": 10},
        {"id": 50, "file_name": "COCO_val2014_000000000050.jpg", "width": 12, "height": 8},
    ]
    for k, im in enumerate(images):
        path = img_dir / im["file_name"]
        arr = _rgb(im["height"], im["width"], 10 + k)
        if im["id"] == 7:
            Image.fromarray(arr[:, :, 0]).save(path, quality=95)  # grayscale JPEG (COCO has some)
        else:
            Image.fromarray(arr).save(path, quality=95)
        if im["id"] == 99:
            path.write_bytes(b"\x00garbage, not a JPEG")
    car = mask_api.encode(np.asfortranarray(_car_mask().astype(np.uint8)))
    annotations = [
        # polygon (axis-aligned rectangle 4..12 x 4..10)
        {"id": 1, "image_id": 42, "category_id": 1, "iscrowd": 0, "area": 48.0,
         "bbox": [4, 4, 8, 6], "segmentation": [[4, 4, 12, 4, 12, 10, 4, 10]]},
        # compressed RLE (string counts)
        {"id": 2, "image_id": 42, "category_id": 3, "iscrowd": 0, "area": 48.0, "bbox": [2, 14, 10, 6],
         "segmentation": {"size": [_COCO_H, _COCO_W], "counts": car["counts"].decode("ascii")}},
        # crowd: uncompressed RLE
        {"id": 3, "image_id": 42, "category_id": 3, "iscrowd": 1, "area": 191.0, "bbox": [20, 2, 10, 20],
         "segmentation": {"size": [_COCO_H, _COCO_W], "counts": _rle_counts(_crowd_mask())}},
        {"id": 4, "image_id": 7, "category_id": 90, "iscrowd": 0, "area": 20.0,
         "bbox": [2.5, 3.0, 5.0, 4.0], "segmentation": [[2, 3, 7, 3, 7, 7, 2, 7]]},
        {"id": 5, "image_id": 99, "category_id": 1, "iscrowd": 0, "area": 4.0,
         "bbox": [1, 1, 2, 2], "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]]},
    ]  # fmt: skip
    categories = [  # deliberately out of id order
        {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 3, "name": "car", "supercategory": "vehicle"},
    ]
    ann_path = base / "annotations" / "instances_val2014.json"
    ann_path.parent.mkdir()
    ann_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(ann_path), str(img_dir)


def test_coco_records_exact(coco_files):
    ann, img_dir = coco_files
    ds = data.open_coco(ann, img_dir)
    assert ds.class_names == ("person", "car", "toothbrush") and ds.category_ids == (1, 3, 90)
    assert len(ds) == 4
    assert [ds.coco_image_id(i) for i in range(4)] == [7, 42, 50, 99]
    assert ds.image_id(1) == "COCO_val2014_000000000042"

    r = ds[1]
    np.testing.assert_array_equal(r.image, _expected_pixels(os.path.join(img_dir, "COCO_val2014_000000000042.jpg")))
    np.testing.assert_array_equal(r.labels, [0, 1, 1])
    np.testing.assert_array_equal(r.boxes, [[4, 4, 12, 10], [2, 14, 12, 20], [20, 2, 30, 22]])
    np.testing.assert_array_equal(r.difficult, [False, False, False])  # crowd="include"
    # polygon rectangle -> exactly the pixels whose centres it contains
    np.testing.assert_array_equal(r.masks[0], boxes_to_mask(np.array([[4, 4, 12, 10]]), _COCO_H, _COCO_W))
    np.testing.assert_array_equal(r.masks[1], _car_mask())  # compressed RLE
    np.testing.assert_array_equal(r.masks[2], _crowd_mask())  # uncompressed RLE, crowd
    # TorchRay's class region: union of all instance masks of the class, crowd included
    np.testing.assert_array_equal(class_mask(r, 1), _car_mask() | _crowd_mask())

    g = ds[0]  # grayscale JPEG -> RGB with equal channels
    assert g.image.shape == (16, 20, 3)
    np.testing.assert_array_equal(g.image[..., 0], g.image[..., 2])
    np.testing.assert_array_equal(g.labels, [2])
    np.testing.assert_allclose(g.boxes, [[2.5, 3.0, 7.5, 7.0]])

    e = ds[2]  # no annotations
    assert e.num_objects == 0 and e.masks.shape == (0, 8, 12)
    np.testing.assert_array_equal(ds.labels(1), [0, 1, 1])


def test_coco_crowd_modes(coco_files):
    ann, img_dir = coco_files
    ex = data.open_coco(ann, img_dir, crowd="exclude")
    r = ex[1]
    np.testing.assert_array_equal(r.labels, [0, 1])
    np.testing.assert_array_equal(class_mask(r, 1), _car_mask())
    dif = data.open_coco(ann, img_dir, crowd="difficult")[1]
    np.testing.assert_array_equal(dif.difficult, [False, False, True])
    np.testing.assert_array_equal(class_mask(dif, 1, include_difficult=False), _car_mask())
    with pytest.raises(ValueError, match="crowd"):
        data.open_coco(ann, img_dir, crowd="maybe")
    only = data.open_coco(ann, img_dir, require_objects=True)
    assert [only.coco_image_id(i) for i in range(len(only))] == [7, 42, 99]


def test_coco_resize_and_corrupt(coco_files):
    ann, img_dir = coco_files
    native = data.open_coco(ann, img_dir)
    ds = data.open_coco(ann, img_dir, size=(48, 64))  # x2 both ways for image 42
    r, r0 = ds[1], native[1]
    assert r.image.shape == (48, 64, 3)
    np.testing.assert_array_equal(r.boxes, r0.boxes * 2)
    np.testing.assert_array_equal(r.masks, np.repeat(np.repeat(r0.masks, 2, axis=1), 2, axis=2))
    np.testing.assert_array_equal(r.labels, r0.labels)

    with pytest.warns(SkippedImageWarning, match="000000000099"):
        recs = list(ds)
    assert [x.image_id[-2:] for x in recs] == ["07", "42", "50"]
    assert ds.num_skipped == 1 and 3 in ds.skipped
    with pytest.raises(CorruptImageError):
        native[3]


def test_coco_missing_and_bad_inputs(coco_files, tmp_path):
    ann, img_dir = coco_files
    with pytest.raises(DatasetLayoutError, match="instances_missing.json"):
        data.open_coco(tmp_path / "instances_missing.json", img_dir)
    with pytest.raises(DatasetLayoutError, match="no_images_here"):
        data.open_coco(ann, tmp_path / "no_images_here")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(ValueError, match="annotations"):
        data.open_coco(bad, img_dir)


# ============================================================================ ImageNet-seg


def _write_mat(path, entries, *, with_target=True, drop=None):
    """Write the gtsegs_ijcv.mat layout: value/{img,gt,target} (N, 1) references into #refs#,
    arrays stored with MATLAB's reversed axes; each gt entry is a (1, 1) cell of references."""
    h5py = pytest.importorskip("h5py")
    ref_dtype = h5py.special_dtype(ref=h5py.Reference)
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        value = f.create_group("value")
        n = len(entries)
        img_refs = np.empty((n, 1), object)
        gt_refs = np.empty((n, 1), object)
        tgt_refs = np.empty((n, 1), object)
        for i, (img, mask, wnid) in enumerate(entries):
            d_img = refs.create_dataset(f"img{i}", data=img.T if img.ndim == 2 else img.transpose(2, 1, 0))
            d_mask = refs.create_dataset(f"mask{i}", data=mask.T.astype(np.uint8))
            cell = refs.create_dataset(f"cell{i}", (1, 1), dtype=ref_dtype)
            cell[0, 0] = d_mask.ref
            img_refs[i, 0], gt_refs[i, 0] = d_img.ref, cell.ref
            d_t = refs.create_dataset(f"target{i}", data=np.array([[ord(c)] for c in wnid], np.uint16))
            tgt_refs[i, 0] = d_t.ref
        for name, arr in (("img", img_refs), ("gt", gt_refs), ("target", tgt_refs)):
            if name == drop or (name == "target" and not with_target):
                continue
            ds = value.create_dataset(name, (n, 1), dtype=ref_dtype)
            for i in range(n):
                ds[i, 0] = arr[i, 0]


def _seg_entries():
    img0 = _rgb(6, 10, 20)  # H=6, W=10: a wrong transposition changes the shape
    m0 = np.zeros((6, 10), bool)
    m0[1:5, 2:7] = True
    m0[1, 2] = False
    gray = _rgb(4, 6, 21)[:, :, 1]  # a grayscale image stored 2-D
    m1 = np.zeros((4, 6), bool)
    m1[0:2, 3:6] = True
    bad_img = _rgb(5, 5, 22)
    bad_mask = np.zeros((4, 5), bool)  # wrong size -> skipped
    img3 = _rgb(3, 4, 23)
    m3 = np.zeros((3, 4), bool)  # all background
    return [(img0, m0, "n01443537"), (gray, m1, "n02084071"), (bad_img, bad_mask, "n01443537"), (img3, m3, "n99999999")]


@pytest.fixture(scope="module")
def seg_mat(tmp_path_factory):
    path = tmp_path_factory.mktemp("seg") / "gtsegs_ijcv.mat"
    _write_mat(path, _seg_entries())
    return str(path)


def test_imagenet_seg_records_exact(seg_mat):
    entries = _seg_entries()
    ds = data.open_imagenet_seg(seg_mat, wnids=["n00000001", "n01443537"])
    assert len(ds) == 4 and ds.class_names == ("foreground",)
    r = ds[0]
    np.testing.assert_array_equal(r.image, entries[0][0].astype(np.float32) / 255.0)  # lossless
    np.testing.assert_array_equal(r.labels, [0])
    np.testing.assert_array_equal(r.masks[0], entries[0][1])
    np.testing.assert_array_equal(r.boxes, [[2, 1, 7, 5]])
    np.testing.assert_array_equal(r.difficult, [False])
    assert ds.wnid(0) == "n01443537" and ds.class_index(0) == 1
    assert ds.wnid(1) == "n02084071" and ds.class_index(1) == -1  # not in the given list
    assert r.image_id == "imagenet_seg_00000_n01443537"

    g = ds[1]
    assert g.image.shape == (4, 6, 3)
    np.testing.assert_array_equal(g.image, np.repeat(entries[1][0][:, :, None], 3, 2) / np.float32(255))
    np.testing.assert_array_equal(g.masks[0], entries[1][1])
    np.testing.assert_array_equal(g.boxes, [[3, 0, 6, 2]])

    empty = ds[3]
    assert empty.num_objects == 0 and empty.image.shape == (3, 4, 3)
    assert data.open_imagenet_seg(seg_mat).class_index(0) == -1  # no wnids list


def test_imagenet_seg_resize_and_skip(seg_mat):
    ds = data.open_imagenet_seg(seg_mat, size=(12, 20))  # image 0 is 6 x 10: x2
    r = ds[0]
    m0 = _seg_entries()[0][1]
    assert r.image.shape == (12, 20, 3)
    np.testing.assert_array_equal(r.masks[0], np.repeat(np.repeat(m0, 2, 0), 2, 1))
    np.testing.assert_array_equal(r.boxes, [[4, 2, 14, 10]])
    with pytest.warns(SkippedImageWarning, match="differ in size"):
        recs = list(ds)
    assert len(recs) == 3 and ds.num_skipped == 1 and list(ds.skipped) == [2]
    with pytest.raises(CorruptImageError):
        ds[2]


def test_imagenet_seg_bad_inputs(tmp_path):
    pytest.importorskip("h5py")
    with pytest.raises(DatasetLayoutError, match="gtsegs_missing.mat"):
        data.open_imagenet_seg(tmp_path / "gtsegs_missing.mat")
    not_h5 = tmp_path / "v5.mat"
    not_h5.write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))
    with pytest.raises(ValueError, match="HDF5"):
        data.open_imagenet_seg(not_h5)
    no_gt = tmp_path / "no_gt.mat"
    _write_mat(no_gt, _seg_entries()[:1], drop="gt")
    with pytest.raises(DatasetLayoutError, match="value/gt"):
        data.open_imagenet_seg(no_gt)
    no_target = tmp_path / "no_target.mat"
    _write_mat(no_target, _seg_entries()[:1], with_target=False)
    ds = data.open_imagenet_seg(no_target)
    assert ds.wnid(0) is None and ds.class_index(0) == -1 and ds[0].image_id == "imagenet_seg_00000"
