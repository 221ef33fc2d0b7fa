import numpy as np
import pytest

from lowshot.config import ProbeSettings
from lowshot.data.subsets import (
    class_orders,
    k_shot,
    match_split_file,
    percent_count,
    percent_subset,
    read_split_file,
    split_file_label,
)
from lowshot.errors import SettingError, SplitError

from .conftest import IMAGENETTE, SPLITS


def toy(n_per_class=(7, 9, 12)):
    ids, labels = [], []
    for c, n in enumerate(n_per_class):
        ids += [f"c{c}/img{i:03d}.jpg" for i in range(n)]
        labels += [c] * n
    return ids, np.array(labels), [f"class{c}" for c in range(len(n_per_class))]


def test_k_shot_subsets_are_nested_within_a_seed_and_differ_across_seeds():
    ids, labels, classes = toy()
    orders = class_orders(ids, labels, classes, seed=0)
    one, two, five = (set(k_shot(orders, classes, k)) for k in (1, 2, 5))
    assert one < two < five
    assert len(five) == 15 and all(np.bincount(labels[list(five)]) == 5)
    other = set(k_shot(class_orders(ids, labels, classes, seed=1), classes, 5))
    assert other != five


def test_draw_depends_on_ids_not_on_feature_order():
    ids, labels, classes = toy()
    chosen = {ids[i] for i in k_shot(class_orders(ids, labels, classes, 3), classes, 2)}
    perm = np.random.default_rng(0).permutation(len(ids))
    ids2, labels2 = [ids[i] for i in perm], labels[perm]
    chosen2 = {ids2[i] for i in k_shot(class_orders(ids2, labels2, classes, 3), classes, 2)}
    assert chosen == chosen2


def test_class_with_too_few_images_is_named_unless_allowed():
    ids, labels, classes = toy((7, 3, 12))
    orders = class_orders(ids, labels, classes, 0)
    with pytest.raises(SplitError, match=r"class1 \(3\)"):
        k_shot(orders, classes, 5)
    assert len(k_shot(orders, classes, 5, allow_fewer=True)) == 5 + 3 + 5
    with pytest.raises(SettingError, match="shots 0"):  # refused by the settings, the one check, before any draw
        ProbeSettings(shots=(0,))


def test_percent_is_stratified_round_half_up_at_least_one_and_nested_with_shots():
    assert [percent_count(n, 1) for n in (1300, 1250, 1249, 40)] == [13, 13, 12, 1]
    ids, labels, classes = toy((150, 250, 50))
    orders = class_orders(ids, labels, classes, 0)
    subset = percent_subset(orders, classes, 2)
    assert list(np.bincount(labels[subset])) == [3, 5, 1]
    assert set(k_shot(orders, classes, 1)) <= set(subset)
    for bad in (0, 101):
        with pytest.raises(SettingError, match=f"percents {bad}"):
            ProbeSettings(percents=(bad,))


def test_published_split_files_parse_and_label_by_content():
    for seed in (1, 2, 3):
        for k in (1, 2):
            path = SPLITS / f"imagenet_subsets{seed}" / f"{k}imgs_class.txt"
            names = read_split_file(path)
            assert len(names) == 1000 * k
            assert split_file_label(path, names) == (f"{k}-shot", k)
    quirk = SPLITS / "imagenet_subsets3" / "3imgs_class.txt"  # 5 per class despite its name
    assert split_file_label(quirk, read_split_file(quirk)) == ("5-shot", 5)
    one_pct = SPLITS / "imagenet_subsets1" / "1percent.txt"
    names = read_split_file(one_pct)
    assert len(names) == 12811 and split_file_label(one_pct, names) == ("1%", None)


def test_published_split_file_matches_imagenette_train_by_file_name_and_reports_the_rest():
    train_ids = sorted(p.relative_to(IMAGENETTE / "train").as_posix()
                       for p in (IMAGENETTE / "train").glob("*/*.JPEG"))
    names = read_split_file(SPLITS / "imagenet_subsets1" / "5imgs_class.txt")
    found, missing = match_split_file(names, train_ids)
    assert len(found) == 38  # PROVENANCE.md: 38 of the 50 Imagenette-class entries are in train, 12 in val
    assert len(missing) == 5000 - 38
    nested = match_split_file(read_split_file(SPLITS / "imagenet_subsets1" / "1imgs_class.txt"), train_ids)[0]
    assert set(nested) <= set(found)


@pytest.mark.parametrize("protocol", [{"shots": [1], "percents": []}, {"shots": [], "percents": [10]}])
def test_a_class_whose_images_all_failed_to_decode_says_so_not_lower_shots(protocol):
    from lowshot.data.subsets import Listing
    from lowshot.protocol import draw_subsets

    ids, labels, classes = toy((7, 3, 12))
    listing = Listing(ids, labels, classes, unreadable=frozenset(np.flatnonzero(labels == 1).tolist()) | {0})
    with pytest.raises(SplitError, match=r"class class1: none of its 3 train images could be read "
                                         r"\(e\.g\. 'c1/img000\.jpg'\)") as caught:
        draw_subsets(listing, seeds=1, **protocol)
    assert "lower --shots" not in str(caught.value)
    readable = Listing(ids, labels, classes, unreadable=frozenset({0, 7}))  # some unreadable: the next are taken
    assert len(draw_subsets(readable, seeds=1, shots=[1], percents=[])[0].indices) == 3
