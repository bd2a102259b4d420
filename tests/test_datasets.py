import numpy as np
import pytest
from PIL import Image

from aecfe_cli.config import Config, DatasetConfig
from aecfe_cli.datasets import detect_layout, resolve
from aecfe_cli.errors import UserError
from aecfe_cli.images import UnreadableImage, load_rgb


def _png(path, mode="RGB", size=(8, 8), value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (size[1], size[0], channels) if channels else (size[1], size[0])
    Image.fromarray(np.full(shape, value, np.uint8), mode if mode != "L" else None).save(path)


def test_acevedo_layout_takes_the_subtype_from_the_prefix(tmp_path):
    for name in ("ig/PMY_1.jpg", "ig/MY_2.jpg", "ig/IG_3.jpg", "neutrophil/SNE_4.jpg", "basophil/BA_5.jpg"):
        _png(tmp_path / name)
    dataset = resolve(str(tmp_path), Config())
    assert dataset.layout == "acevedo"
    labels = {r.rel: r.label for r in dataset.records}
    assert labels == {"ig/PMY_1.jpg": "promyelocyte", "ig/MY_2.jpg": "myelocyte", "ig/IG_3.jpg": "ig",
                      "neutrophil/SNE_4.jpg": "neutrophil_segmented", "basophil/BA_5.jpg": "basophil"}


def test_a_class_split_into_subtypes_gets_a_total_row(tmp_path):
    for name in ("ig/PMY_1.jpg", "ig/PMY_2.jpg", "ig/MY_3.jpg", "ig/IG_4.jpg", "basophil/BA_5.jpg", "basophil/BA_6.jpg"):
        _png(tmp_path / name)
    rows = resolve(str(tmp_path), Config()).class_rows()
    assert rows == [("basophil", "BA", "basophil", "basophil", 2),  # one subtype: its row is the class's count
                    ("ig", "IG", "-", "ig", 1), ("ig", "MY", "myelocyte", "ig", 1), ("ig", "PMY", "promyelocyte", "ig", 2),
                    ("ig", "total", "", "ig", 4)]


def test_matek_codes_map_myo_to_myeloblast_and_myb_to_myelocyte(tmp_path):
    for name in ("MYO/MYO_0001.tiff", "MYB/MYB_0001.tiff", "NGS/NGS_0001.tiff"):
        _png(tmp_path / name)
    dataset = resolve(str(tmp_path), Config())
    assert dataset.layout == "matek"
    assert {r.original: r.label for r in dataset.records} == {
        "MYO": "myeloblast", "MYB": "myelocyte", "NGS": "neutrophil_segmented"}


def test_folder_layout_keeps_unmapped_names_and_counts(tmp_path):
    for i in range(3):
        _png(tmp_path / "Lymphocytes" / f"{i}.png")
    _png(tmp_path / "weird cell" / "a b é.png")
    dataset = resolve(str(tmp_path), Config())
    assert dataset.layout == "folder"
    assert dataset.counts() == [("Lymphocytes", "-", "lymphocyte", 3), ("weird cell", "-", "weird cell", 1)]


def test_csv_layout_with_template_and_numeric_label_map(tmp_path):
    _png(tmp_path / "img" / "007.bmp")
    _png(tmp_path / "img" / "012.bmp")
    (tmp_path / "labels.csv").write_text("image ID,class label\n7,1\n12,3\n")
    config = Config(datasets={"z": DatasetConfig(layout="csv", root=str(tmp_path), csv="labels.csv",
                                                 path_column="image ID", label_column="class label",
                                                 path_template="img/{:0>3}.bmp", label_map={1: "neutrophil", 3: "monocyte"})})
    dataset = resolve("z", config)
    assert [(r.rel, r.label) for r in dataset.records] == [("img/007.bmp", "neutrophil"), ("img/012.bmp", "monocyte")]


def test_csv_naming_missing_files_fails_with_the_names(tmp_path):
    (tmp_path / "list.csv").write_text("path,label\nnot_there.png,monocyte\n")
    with pytest.raises(UserError, match=r"list.csv: 1 listed image\(s\) do not exist.*not_there.png"):
        resolve(str(tmp_path / "list.csv"), Config())


def test_registered_name_without_root_says_how_to_set_it():
    with pytest.raises(UserError, match="AECFE_MATEK_ROOT"):
        resolve("matek", Config())


def test_env_root_is_used(tmp_path, monkeypatch):
    _png(tmp_path / "EOS" / "EOS_0001.tiff")
    monkeypatch.setenv("AECFE_MATEK_ROOT", str(tmp_path))
    assert resolve("matek", Config()).records[0].label == "eosinophil"


def test_unknown_layout_and_empty_folder(tmp_path):
    with pytest.raises(UserError, match="unknown layout 'foldr'.*did you mean 'folder'"):
        resolve(str(tmp_path), Config(), layout="foldr")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        resolve(str(tmp_path), Config())


def test_image_conversions(tmp_path):
    grey16 = tmp_path / "g16.tif"
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(grey16)
    assert load_rgb(grey16).shape == (4, 4, 3) and load_rgb(grey16).max() == 255
    _png(tmp_path / "rgba.png", mode="RGBA", value=0)  # fully transparent -> white background
    assert load_rgb(tmp_path / "rgba.png").min() == 255
    _png(tmp_path / "grey.png", mode="L", value=7)
    assert load_rgb(tmp_path / "grey.png")[0, 0].tolist() == [7, 7, 7]
    palette = Image.new("P", (4, 4))
    palette.save(tmp_path / "p.png")
    assert load_rgb(tmp_path / "p.png").dtype == np.uint8


def test_bad_images_raise_unreadable(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    _png(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    for name in ("zero.png", "text.jpg", "truncated.jpg"):
        with pytest.raises(UnreadableImage, match=name):
            load_rgb(tmp_path / name)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    import aecfe_cli.images as images

    _png(tmp_path / "big.png", size=(100, 100))
    monkeypatch.setattr(images, "MAX_PIXELS", 50 * 50)
    with pytest.raises(UnreadableImage, match="decompression bomb|exceeds"):
        load_rgb(tmp_path / "big.png")


def test_symlink_loop_is_listed_not_fatal(tmp_path):
    _png(tmp_path / "monocyte" / "a.png")
    (tmp_path / "monocyte" / "loop.png").symlink_to(tmp_path / "monocyte" / "loop.png")
    dataset = resolve(str(tmp_path), Config())
    assert [r.rel for r in dataset.records] == ["monocyte/a.png"]
    assert any("loop.png" in s for s in dataset.skipped)


def test_detect_layout_of_numbered_folders(tmp_path):
    _png(tmp_path / "01-NORMO" / "a.TIF")
    assert detect_layout(tmp_path) == "int20"
