"""Readers, schema encoding and the batch pipeline, on small files the tests write."""

import json

import numpy as np
import pytest

from recsys.data import (
    ColumnOptions,
    DataError,
    DataSchema,
    Dataset,
    Encoding,
    Examples,
    OnError,
    Position,
    Prefetcher,
    ReadOptions,
    eval_batches,
    open_data,
    preprocess_criteo,
    train_batches,
)
from recsys.data.formats import CriteoFormat
from recsys.data.readers import TextReader
from recsys.data.schema import hash_tokens
from recsys.sparse import RaggedIds
from recsys.specs import SparseOptimizerSpec


def criteo_line(label, ints, cats):
    return "\t".join([str(label), *[str(i) for i in ints], *cats]) + "\n"


def write_criteo(path, n=50, seed=0):
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        ints = ["" if rng.random() < 0.2 else int(rng.integers(-2, 1000)) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{int(rng.integers(0, 40)):08x}" for _ in range(26)]
        lines.append(criteo_line(i % 2, ints, cats))
    path.write_text("".join(lines))
    return lines


def test_criteo_parses_transforms_and_hashes(tmp_path):
    path = tmp_path / "day.tsv"
    path.write_text(criteo_line(1, [3, "", -2, *[0] * 10], ["0000abcd", "", *["ff"] * 24]))
    opened = open_data(
        f"criteo:{path}", f"criteo:{path}", ReadOptions(columns=ColumnOptions(encoding="hash", rows=101))
    )
    ex = opened.train.chunk(0)
    assert ex.labels.tolist() == [1.0]
    np.testing.assert_allclose(ex.dense[0, :3], [np.log1p(3), 0.0, -np.log1p(2)], rtol=1e-6)
    assert ex.sparse["C1"].values[0] == hash_tokens([0xABCD], 101)[0]
    assert 1 <= ex.sparse["C1"].values[0] < 101
    assert ex.sparse["C2"].values[0] == 0  # missing -> the reserved row
    assert [c.rows for c in opened.schema.sparse] == [101] * 26


def test_criteo_block_parser_matches_the_line_parser(tmp_path):
    class LineByLine(CriteoFormat):
        def parse_block(self, data):
            return None

    path = tmp_path / "day.tsv"
    lines = write_criteo(path, n=300, seed=4)
    lines[7] = criteo_line(1, [-17, 0, "", 123456789012, *[5] * 9], ["", "fffffffffffffff", *["0a"] * 24])
    path.write_text("".join(lines))
    schema = open_data(f"criteo:{path}", f"criteo:{path}").schema
    fast, slow = (TextReader([str(path)], fmt, chunk_rows=128) for fmt in (CriteoFormat(), LineByLine()))
    for chunk in fast.chunks:
        a, b = schema.encode(fast.read_raw(chunk)), schema.encode(slow.read_raw(chunk))
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.dense, b.dense)
        for name in a.sparse:
            np.testing.assert_array_equal(a.sparse[name].values, b.sparse[name].values)
            np.testing.assert_array_equal(a.sparse[name].lengths, b.sparse[name].lengths)


@pytest.mark.parametrize(
    "line, message",
    [
        ("1\t2\n", "expected 40 tab-separated fields"),
        (criteo_line(2, [0] * 13, ["a"] * 26), "label '2' is not 0 or 1"),
        (criteo_line(0, ["x", *[0] * 12], ["a"] * 26), "column 'I1': integer feature 'x'"),
        (
            criteo_line(0, [0] * 13, ["zz", *["a"] * 25]),
            "column 'C1': categorical value 'zz' is not hexadecimal",
        ),
        (
            criteo_line(0, [0] * 13, ["-1", *["a"] * 25]),
            "column 'C1': categorical value '-1' is not up to 15",
        ),
        (criteo_line(0, ["1.5", *[0] * 12], ["a"] * 26), "column 'I1': integer feature '1.5'"),
        (criteo_line(0, [0] * 13, ["a"] * 26).replace("\n", "\r\n"), None),  # CRLF is fine
    ],
)
def test_criteo_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.tsv"
    good = criteo_line(0, [1] * 13, ["a"] * 26)
    path.write_text(good + good + line + good)
    if message is None:  # not malformed after all: the line-by-line path accepts it
        assert len(open_data(f"criteo:{path}", f"criteo:{path}").train) == 4
        return
    with pytest.raises(DataError, match=f"bad.tsv:3: .*{message}"):
        open_data(f"criteo:{path}", f"criteo:{path}")


def test_skip_policy_counts_and_reports(tmp_path):
    path = tmp_path / "bad.tsv"
    good = criteo_line(1, [1] * 13, ["a"] * 26)
    path.write_text(good * 3 + "garbage\n" + good * 3 + "1\tx\n" + good * 4)
    opened = open_data(f"criteo:{path}", f"criteo:{path}", ReadOptions(on_error=OnError.SKIP))
    assert len(opened.train) == 10
    assert opened.train_report.total() == 2
    assert "bad.tsv:4:" in opened.train_report.summary()
    assert "bad.tsv:8:" in opened.train_report.summary()


def test_holdout_splits_by_line_and_schema_sees_only_training_rows(tmp_path):
    path = tmp_path / "data.csv"
    rows = ["label,item"] + [f"{i % 2},a{i}" for i in range(10)]
    path.write_text("\n".join(rows) + "\n")
    opened = open_data(f"csv:{path}", options=ReadOptions(holdout=0.3, chunk_rows=4))
    assert (len(opened.train), len(opened.eval)) == (7, 3)
    vocab = opened.schema.sparse[0].vocab
    assert set(vocab) == {f"a{i}" for i in range(7)}  # no held-out token in the vocabulary
    held_out = Examples.concat([opened.eval.chunk(i) for i in range(opened.eval.num_chunks)])
    assert held_out.sparse["item"].values.tolist() == [0, 0, 0]  # unseen -> out-of-vocabulary row
    assert held_out.labels.tolist() == [1.0, 0.0, 1.0]


def test_csv_multi_hot_vocab_quotes_and_dense(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('id,click,price,tags,city\n7,1,2.5,"x|y|x",paris\n8,0,,y,\n9,1,-1,z|y,rome\n')
    options = ReadOptions(label="click", dense=("price",), ignore=("id",), multi_hot_sep="|")
    opened = open_data(f"csv:{path}", f"csv:{path}", options)
    tags, city = opened.schema.sparse
    assert (tags.name, city.name) == ("tags", "city")
    assert tags.vocab[0] == "y" and tags.max_ids == 3  # most frequent first; widest bag
    ex = opened.train.chunk(0)
    assert ex.sparse["tags"].lengths.tolist() == [3, 1, 2]
    row = {t: i + 1 for i, t in enumerate(tags.vocab)}
    assert ex.sparse["tags"].values.tolist() == [row["x"], row["y"], row["x"], row["y"], row["z"], row["y"]]
    assert ex.sparse["city"].lengths.tolist() == [1, 0, 1]  # an empty field is an empty bag
    # A column with negative values is standardized over the training rows (missing: 0).
    price = np.array([2.5, 0.0, -1.0])
    np.testing.assert_allclose(ex.dense[:, 0], (price - price.mean()) / price.std(), rtol=1e-5)


def test_csv_dense_columns_are_logged_or_standardized_by_their_training_rows(tmp_path):
    """Counts with a long tail take the log; a year or an age is centred and scaled. The
    choice and its statistics travel with the schema."""
    rng = np.random.default_rng(0)
    n = 400
    year, age = rng.integers(1980, 2020, n), rng.integers(18, 70, n)
    clicks = rng.pareto(1.5, n).round().astype(int) * 10
    lines = ["label,year,age,clicks,item"] + [
        f"{i % 2},{year[i]},{age[i]},{clicks[i]},a{i % 7}" for i in range(n)
    ]
    path = tmp_path / "d.csv"
    path.write_text("\n".join(lines) + "\n")
    options = ReadOptions(label="label", dense=("year", "age", "clicks"), holdout=0.25)
    opened = open_data(f"csv:{path}", options=options)
    kinds = [s.kind for s in opened.schema.dense_scales]
    assert kinds == ["standardize", "standardize", "log"], opened.schema.dense_scales
    train = np.array([year, age], float)[:, :300]
    ex = opened.train.chunk(0)
    np.testing.assert_allclose(ex.dense[:, 0], (year[:300] - train[0].mean()) / train[0].std(), rtol=1e-4)
    assert abs(ex.dense[:, 1].mean()) < 1e-4 and abs(ex.dense[:, 1].std() - 1) < 1e-4
    np.testing.assert_allclose(ex.dense[:, 2], np.log1p(clicks[:300]), rtol=1e-5)
    again = DataSchema.from_json(json.loads(json.dumps(opened.schema.to_json())))
    assert again == opened.schema and again.fingerprint() == opened.schema.fingerprint()


@pytest.mark.parametrize(
    "row, message",
    [
        ("1,nan,a", "column 'price': dense value 'nan' is not finite"),
        ("1,abc,a", "column 'price': dense value 'abc' is not a number"),
        ("yes,1,a", "column 'label': label 'yes'"),
        ("1,2", "expected 3 fields as in the header, got 2"),
    ],
)
def test_csv_malformed_rows(tmp_path, row, message):
    path = tmp_path / "d.csv"
    path.write_text(f"label,price,item\n1,1,a\n{row}\n")
    with pytest.raises(DataError, match=f"d.csv:3: .*{message}"):
        open_data(f"csv:{path}", f"csv:{path}", ReadOptions(dense=("price",)))


def test_csv_missing_or_reused_column_is_named(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("click,item\n1,a\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['label'\]"):
        open_data(f"csv:{path}")
    with pytest.raises(ValueError, match=r"\['click'\] named more than once"):
        open_data(f"csv:{path}", options=ReadOptions(label="click", sparse=("item", "click")))


def test_column_options_validate():
    assert ColumnOptions(encoding="vocab").encoding is Encoding.VOCAB
    with pytest.raises(ValueError, match="is not a valid Encoding"):
        ColumnOptions(encoding="onehot")
    with pytest.raises(ValueError, match="row 0 is reserved"):
        ColumnOptions(rows=1)


def test_csv_hash_encoding_with_given_rows(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("label,user\n1,alice\n0,bob\n1,alice\n")
    options = ReadOptions(columns=ColumnOptions(encoding="hash", rows=1000))
    opened = open_data(f"csv:{path}", f"csv:{path}", options)
    values = opened.train.chunk(0).sparse["user"].values
    assert values.tolist() == hash_tokens(["alice", "bob", "alice"], 1000).tolist()
    assert values[0] == values[2] != values[1]


def test_libfm_positional_and_field_map(tmp_path):
    path = tmp_path / "d.libfm"
    path.write_text("1 3:1 10:1\n-1 4:1 11:1\n0 3:1 12:0.5\n\n+1 5:1\n")
    opened = open_data(f"libfm:{path}", f"libfm:{path}")
    assert [c.name for c in opened.schema.sparse] == ["field0", "field1"]
    ex = opened.train.chunk(0)
    assert ex.labels.tolist() == [1, 0, 0, 1]
    assert ex.sparse["field1"].lengths.tolist() == [1, 1, 1, 0]  # the last line has one field
    assert opened.schema.sparse[1].weighted  # a value other than 1
    np.testing.assert_allclose(ex.sparse["field1"].weights, [1, 1, 0.5])

    fields = tmp_path / "fields.txt"
    fields.write_text("3 user\n4 user\n5 user\n10 item\n11 item\n12 item\n")
    path.write_text("1 3:1 10:1 11:1\n0 4:1\n")
    opened = open_data(f"libfm:{path}", f"libfm:{path}", ReadOptions(libfm_fields=str(fields)))
    assert [c.name for c in opened.schema.sparse] == ["user", "item"]
    ex = opened.train.chunk(0)
    assert ex.sparse["item"].lengths.tolist() == [2, 0] and opened.schema.sparse[1].max_ids == 2


@pytest.mark.parametrize(
    "line, message",
    [("1 3:1 x\n", "'x' is not index:value"), ("2 3:1\n", "label '2'"), ("1 3:inf\n", "not finite")],
)
def test_libfm_malformed(tmp_path, line, message):
    path = tmp_path / "d.libfm"
    path.write_text("1 3:1\n" + line)
    with pytest.raises(DataError, match=f"d.libfm:2: .*{message}"):
        open_data(f"libfm:{path}", f"libfm:{path}")


def test_libfm_eval_line_with_more_fields_than_training(tmp_path):
    train, test = tmp_path / "train.libfm", tmp_path / "test.libfm"
    train.write_text("1 3:1\n0 4:1\n")
    test.write_text("1 3:1 5:1\n")
    with pytest.raises(DataError, match="test.libfm:1: 2 fields, but the training data has 1"):
        open_data(f"libfm:{train}", f"libfm:{test}")


def test_globs_and_lists(tmp_path):
    for i in range(3):
        write_criteo(tmp_path / f"day_{i}.tsv", n=10, seed=i)
    opened = open_data(
        f"criteo:{tmp_path}/day_*.tsv", f"criteo:{tmp_path / 'day_0.tsv'},{tmp_path / 'day_1.tsv'}"
    )
    assert (len(opened.train), len(opened.eval)) == (30, 20)
    with pytest.raises(FileNotFoundError, match="no file matches"):
        open_data(f"criteo:{tmp_path}/nope_*.tsv")


def test_parquet_list_and_string_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table(
        {
            "y": [1, 0, 1, 0],
            "x": [0.5, 1.0, None, 2.0],
            "tags": [["a", "b"], [], ["b"], ["c", "a", "b"]],
            "city": ["p|q", "q", None, "p"],
        }
    )
    path = tmp_path / "d.parquet"
    pq.write_table(table, path, row_group_size=3)
    options = ReadOptions(label="y", dense=("x",), multi_hot_sep="|")
    opened = open_data(f"parquet:{path}", f"parquet:{path}", options)
    assert [c.name for c in opened.schema.sparse] == ["tags", "city"]
    assert opened.train.num_chunks == 2  # row groups
    ex = Examples.concat([opened.train.chunk(i) for i in range(2)])
    assert ex.sparse["tags"].lengths.tolist() == [2, 0, 1, 3]
    assert ex.sparse["city"].lengths.tolist() == [2, 1, 0, 1]
    x = np.array([0.5, 1.0, 0.0, 2.0])  # a missing value reads as 0; no long tail: standardized
    np.testing.assert_allclose(ex.dense[:, 0], (x - x.mean()) / x.std(), rtol=1e-5)

    bad = pa.table({"y": [1, 3], "x": [0.0, 1.0], "tags": [["a"], ["b"]], "city": ["p", "q"]})
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="bad.parquet:row 1: column 'y': label 3 is not"):
        open_data(f"parquet:{tmp_path / 'bad.parquet'}", f"parquet:{path}", options)


def test_criteo_binary_matches_text(tmp_path):
    write_criteo(tmp_path / "a.tsv", n=40, seed=1)
    write_criteo(tmp_path / "b.tsv", n=25, seed=2)
    spec = f"criteo:{tmp_path}/a.tsv,{tmp_path}/b.tsv"
    options = ReadOptions(columns=ColumnOptions(encoding="hash", rows=64), chunk_rows=16)
    schema = preprocess_criteo(
        spec.partition(":")[2], str(tmp_path / "bin"), options, progress=lambda _: None
    )
    text = open_data(spec, spec, options)
    binary = open_data(f"criteo:{tmp_path / 'bin'}", spec, options)
    assert binary.schema == schema == text.schema
    whole = lambda d: Examples.concat([d.chunk(i) for i in range(d.num_chunks)])  # noqa: E731
    a, b = whole(text.train), whole(binary.train)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.dense, b.dense, rtol=1e-6)
    for name in a.sparse:
        np.testing.assert_array_equal(a.sparse[name].values, b.sparse[name].values)
    meta = json.loads((tmp_path / "bin" / "meta.json").read_text())
    assert meta["rows"] == 65


def _dataset(n=103, chunk=10):
    ids = np.arange(n)
    examples = Examples(
        dense=ids[:, None].astype(np.float32),
        sparse={"f": RaggedIds(ids % 7, np.ones(n, np.int64))},
        labels=(ids % 2).astype(np.float32),
    )
    return Dataset.in_memory(examples, chunk_rows=chunk)


def test_train_batches_cover_each_epoch_once_and_resume_exactly():
    data = _dataset()
    stream = train_batches(data, 16, seed=3)
    first = [next(stream) for _ in range(20)]  # 6 batches per epoch (103 // 16), 3+ epochs
    for epoch in range(3):
        seen = np.concatenate([b.dense[:, 0] for b, _ in first[6 * epoch : 6 * epoch + 6]])
        assert len(set(seen.tolist())) == 96  # no example twice within an epoch
    assert first[5][1] == Position(1, 0, 0)  # the epoch's partial remainder is dropped
    assert not np.array_equal(first[0][0].dense, first[6][0].dense)  # a new order per epoch
    for k in (3, 5, 8, 13):
        resumed = train_batches(data, 16, seed=3, start=first[k][1])
        for batch, after in first[k + 1 : k + 5]:
            again, again_after = next(resumed)
            np.testing.assert_array_equal(again.dense, batch.dense)
            assert again_after == after


def test_eval_batches_pad_the_last_batch():
    data = _dataset(n=35)
    batches = list(eval_batches(data, 16))
    assert [valid for _, valid in batches] == [16, 16, 3]
    assert all(len(b) == 16 for b, _ in batches)
    got = np.concatenate([b.dense[:valid, 0] for b, valid in batches])
    np.testing.assert_array_equal(got, np.arange(35))


def test_prefetcher_passes_items_and_errors():
    assert list(Prefetcher(iter(range(10)), lambda x: x * 2, depth=2)) == [2 * i for i in range(10)]

    def failing():
        yield 1
        raise DataError("broken", path="f.tsv", line=9)

    it = Prefetcher(failing())
    assert next(it) == 1
    with pytest.raises(DataError, match="f.tsv:9: broken"):
        next(it)


def test_preprocess_cli(tmp_path, capsys):
    from recsys.data import preprocess

    write_criteo(tmp_path / "a.tsv", n=30)
    assert preprocess.main([str(tmp_path / "a.tsv"), str(tmp_path / "out"), "--rows", "100"]) == 0
    assert "C26=100" in capsys.readouterr().out
    opened = open_data(f"criteo:{tmp_path / 'out'}", options=ReadOptions(holdout=0.2))
    assert (len(opened.train), len(opened.eval)) == (24, 6)
    assert not (tmp_path / "out" / ".partial").exists()


def test_criteo_vocab_encoding_across_a_holdout_boundary(tmp_path):
    path = tmp_path / "day.tsv"
    write_criteo(path, n=60, seed=5)
    options = ReadOptions(columns=ColumnOptions(encoding="vocab"), holdout=0.25, chunk_rows=16)
    opened = open_data(f"criteo:{path}", options=options)
    for column in opened.schema.sparse:
        assert all(isinstance(t, int) and t >= 0 for t in column.vocab), column.name
    train = Examples.concat([opened.train.chunk(i) for i in range(opened.train.num_chunks)])
    assert len(train) == 45
    # Every non-missing training value is in the vocabulary, so only missing ones hit row 0.
    lines = path.read_text().splitlines()[:45]
    missing = np.array([[f == "" for f in line.split("\t")[14:]] for line in lines])
    for j, column in enumerate(opened.schema.sparse):
        np.testing.assert_array_equal(train.sparse[column.name].values == 0, missing[:, j])


def test_multi_hot_criteo_is_materialized_and_read_back_as_fixed_bags(tmp_path):
    from recsys.data.multihot import expand, materialize_multihot

    bags = expand(np.asarray([5, 7, 5]), feature=3, size=4, rows=50)
    assert bags.shape == (3, 4) and (bags[0] == bags[2]).all() and (bags[:, 0] == [5, 7, 5]).all()
    assert ((0 <= bags) & (bags < 50)).all() and not (expand(np.asarray([5]), 4, 4, 50) == bags[0]).all()

    rng = np.random.default_rng(0)
    lines = []
    for _ in range(300):
        dense = "\t".join(str(rng.integers(0, 9)) for _ in range(13))
        sparse = "\t".join(f"{rng.integers(0, 40):08x}" for _ in range(26))
        lines.append(f"{rng.integers(0, 2)}\t{dense}\t{sparse}")
    (tmp_path / "day_0").write_text("\n".join(lines) + "\n")
    sizes, caps = [1 + i % 4 for i in range(26)], [30 + i for i in range(26)]
    for name in ("train", "eval"):
        materialize_multihot(
            str(tmp_path / "day_0"),
            str(tmp_path / name),
            rows=caps,
            multi_hot_sizes=sizes,
            progress=lambda _: None,
        )
    opened = open_data(f"criteo:{tmp_path / 'train'}", f"criteo:{tmp_path / 'eval'}")
    assert (len(opened.train), len(opened.eval)) == (300, 300)
    ex = opened.train.chunk(0)
    for column, size, cap in zip(opened.schema.sparse, sizes, caps):
        bags = ex.sparse[column.name]
        assert (bags.lengths == size).all() and column.max_ids == size and column.rows == cap
        assert bags.values.max() < cap and column.pooling.value == "sum"
    config = opened.schema.embedding_config(8, SparseOptimizerSpec())
    assert {f.pooling.value for f in config.features} == {"sum"}
    # Evaluation data preprocessed with other table sizes is refused.
    materialize_multihot(
        str(tmp_path / "day_0"),
        str(tmp_path / "other"),
        rows=[c + 1 for c in caps],
        multi_hot_sizes=sizes,
        progress=lambda _: None,
    )
    with pytest.raises(DataError, match="another schema"):
        open_data(f"criteo:{tmp_path / 'train'}", f"criteo:{tmp_path / 'other'}")
