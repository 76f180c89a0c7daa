"""Image sets: labels from synset file names or a CSV, deterministic splits, preprocessing."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from timm.data import ImageNetInfo

from models.calibration import ImageSet, imagenet_class_index, parse_label
from tests.shared_data import IMAGENET_SAMPLE, require


def _jpeg(path: Path, grey: bool = False) -> None:
    img = Image.new("L" if grey else "RGB", (40, 30), 128)
    buffer = io.BytesIO()
    img.save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue())


def test_class_index_is_the_sorted_synset_position() -> None:
    index = imagenet_class_index()
    synsets = ImageNetInfo().label_names()
    assert len(index) == 1000
    assert index["n01440764"] == 0 and index["n01443537"] == 1  # tench, goldfish
    assert index[sorted(synsets)[-1]] == 999


@pytest.mark.parametrize(("text", "want"), [("0", 0), (" 17 ", 17), ("n01443537", 1)])
def test_parse_label(text: str, want: int) -> None:
    assert parse_label(text, imagenet_class_index()) == want


@pytest.mark.parametrize("text", ["tench", "n0144376", "n99999999", "-1", ""])
def test_parse_label_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_label(text, imagenet_class_index())


def test_synset_file_names(tmp_path: Path) -> None:
    for name in ("n01443537_goldfish.JPEG", "n01440764_tench.jpg", "n01440764.png"):
        _jpeg(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    images = ImageSet.from_folder(tmp_path)
    assert images.files == ("n01440764.png", "n01440764_tench.jpg", "n01443537_goldfish.JPEG")
    assert images.labels == (0, 0, 1) and images.synset_labels
    assert images.subset([0]).synset_labels


def test_no_synsets_means_no_labels_and_mixed_names_are_refused(tmp_path: Path) -> None:
    _jpeg(tmp_path / "cat.jpg")
    _jpeg(tmp_path / "dog.jpg")
    assert ImageSet.from_folder(tmp_path).labels is None
    _jpeg(tmp_path / "n01440764_tench.jpg")
    with pytest.raises(ValueError, match="no ImageNet synset prefix"):
        ImageSet.from_folder(tmp_path)


def test_labels_csv(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _jpeg(tmp_path / name)
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\nb.jpg,n01443537\na.jpg, 5\n\n")
    images = ImageSet.from_folder(tmp_path, csv)
    assert images.files == ("a.jpg", "b.jpg")  # the CSV's rows, not every file in the folder
    assert images.labels == (5, 1) and images.synset_labels  # a synset: an ImageNet-1k index
    csv.write_text("a.jpg,3\n")  # no header
    indices = ImageSet.from_folder(tmp_path, csv)
    assert indices.labels == (3,) and not indices.synset_labels  # the model's own class indices


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.jpg,goldfish\n", "neither a class index nor a synset"),
        ("a.jpg,1\na.jpg,2\n", "listed twice"),
        ("missing.jpg,1\n", "not in"),
        ("a.jpg,1,extra\n", "expected 'file,label'"),
        ("file,label\n", "lists no images"),
    ],
)
def test_labels_csv_errors(tmp_path: Path, text: str, message: str) -> None:
    _jpeg(tmp_path / "a.jpg")
    csv = tmp_path / "labels.csv"
    csv.write_text(text)
    with pytest.raises(ValueError, match=message):
        ImageSet.from_folder(tmp_path, csv)


def test_split_is_deterministic_disjoint_and_covering(tmp_path: Path) -> None:
    for i in range(10):
        _jpeg(tmp_path / f"img{i}.jpg")
    images = ImageSet.from_folder(tmp_path)
    a, b = images.split(4, seed=3)
    assert (a, b) == images.split(4, seed=3)
    assert len(a) == 4 and len(b) == 6
    assert sorted(a.files + b.files) == list(images.files)
    assert list(a.files) == sorted(a.files)
    assert {images.split(4, seed=s)[0].files for s in range(5)} != {a.files}  # the seed matters


def test_sha256_depends_on_names_and_bytes(tmp_path: Path) -> None:
    _jpeg(tmp_path / "a.jpg")
    before = ImageSet.from_folder(tmp_path).sha256()
    _jpeg(tmp_path / "a.jpg", grey=True)
    assert ImageSet.from_folder(tmp_path).sha256() != before


def test_shared_photos_are_labelled_from_their_names() -> None:
    images = ImageSet.from_folder(require(IMAGENET_SAMPLE))
    synsets = ImageNetInfo().label_names()
    assert len(images) == 200 and images.labels is not None
    for name, label in zip(images.files, images.labels, strict=True):
        assert synsets[label] == name.split("_")[0]


def test_synset_labels_are_refused_for_a_model_without_imagenet_1k_classes(tmp_path: Path) -> None:
    """Synsets map to ImageNet-1k indices: scored against an in21k (or any other) head they would be
    another class's index, and the accuracy figures wrong without a word."""
    import timm

    from models import tome
    from models.calibration import calibrate

    _jpeg(tmp_path / "n01440764_tench.jpg")
    _jpeg(tmp_path / "n01443537_goldfish.jpg")
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=21843)
    with pytest.raises(ValueError, match="ImageNet-1k class indices, but the model has 21843 classes"):
        calibrate(tome.patch(vit), ImageSet.from_folder(tmp_path), architecture="x", weights_sha256=None)


def test_an_image_that_cannot_be_decoded_is_named(tmp_path: Path) -> None:
    """timm's eval transform on a file that is no picture: one ValueError naming the file (it was PIL's
    UnidentifiedImageError, naming a BytesIO)."""
    import timm

    from models.calibration import TimmEvalPreprocess

    _jpeg(tmp_path / "cat.jpg")
    (tmp_path / "dog.jpg").write_bytes(b"not a picture")
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1)
    with pytest.raises(ValueError, match=r"cannot read image .*dog\.jpg"):
        ImageSet.from_folder(tmp_path).load(TimmEvalPreprocess(vit))
