"""The CLIP recipe's offline task folders (issue 19, section 2): an empty folder, class folders of images, a
partial set of IDX files, and unreadable / corrupt / truncated IDX files are one-line errors naming the folder or
file, before any model is loaded; the default negation control is only a folder that holds the IDX files."""

import gzip
import os

import numpy as np
import pytest
from clip_offline import offline_data_dir, write_fake_task, write_idx

from hf_taujp.errors import CorruptFileError, HfTaujpError
from hf_taujp.recipes import clip as C
from hf_taujp.recipes import clip_recipe, vision_tasks


def _no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the data were checked")

    monkeypatch.setattr(clip_recipe, "load_clip", refuse)  # where ClipRecipe loads the model


def test_empty_and_class_folders_are_named(tmp_path, monkeypatch):
    _no_model(monkeypatch)
    data = offline_data_dir(tmp_path, held_out=None)
    os.makedirs(os.path.join(data, "svhn"))
    with pytest.raises(HfTaujpError, match=r"task 'svhn': .*svhn lacks the IDX file\(s\) \['train-images-idx3-ubyte"
                                           r".*\(it is empty\)"):
        C.run_clip(C.TINY, "mnist,svhn", data_dir=data, negation_control="none")
    os.makedirs(os.path.join(data, "svhn", "train", "0"))
    open(os.path.join(data, "svhn", "train", "0", "a.png"), "wb").close()
    with pytest.raises(HfTaujpError, match=r"holds the folder\(s\) \['train'\]: class folders of images are not read"):
        C.run_clip(C.TINY, "mnist,svhn", data_dir=data, negation_control="none")
    write_fake_task(os.path.join(data, "svhn"), 8, 4)
    os.remove(os.path.join(data, "svhn", "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(HfTaujpError, match=r"lacks the IDX file\(s\) \['t10k-labels-idx1-ubyte.gz'\]"):
        C.load_vision_task(C.VISION_TASKS["svhn"], data)


def test_default_control_is_a_folder_with_the_idx_files(tmp_path):
    data = offline_data_dir(tmp_path, held_out=None)
    os.makedirs(os.path.join(data, "svhn"))  # empty: not data
    with pytest.raises(HfTaujpError, match="held out of the targets"):
        C.negation_control_task(None, ["mnist", "fashion_mnist"], data)
    write_fake_task(os.path.join(data, "cars"), 8, 4)
    assert C.negation_control_task(None, ["mnist", "fashion_mnist"], data) == "cars"


def test_corrupt_truncated_and_unreadable_idx_files(tmp_path, monkeypatch):
    good = tmp_path / "good.gz"
    write_idx(str(good), np.zeros((4, 3, 3), np.uint8))
    raw = good.read_bytes()
    cut = tmp_path / "cut.gz"
    cut.write_bytes(raw[: len(raw) // 2])  # a download that stopped half way
    with pytest.raises(CorruptFileError, match=r"cut\.gz: cannot be read as gzip \(EOFError"):
        C.read_idx(str(cut))
    junk = tmp_path / "junk.gz"
    junk.write_bytes(b"not gzip at all")
    with pytest.raises(CorruptFileError, match=r"junk\.gz: cannot be read as gzip \(BadGzipFile"):
        C.read_idx(str(junk))
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(b"\x00\x00\x08\x03\x00\x00\x00\x04")  # 3 dimensions announced, 1 given
    with pytest.raises(CorruptFileError, match=r"short\.gz: IDX header cut short \(8 bytes, 3 dimension"):
        C.read_idx(str(short))

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(vision_tasks.gzip, "open", denied)  # root ignores chmod, so the refusal is simulated
    with pytest.raises(CorruptFileError, match=r"good\.gz: cannot be read as gzip \(PermissionError"):
        C.read_idx(str(good))
