"""Corpus sources: the same documents in the same order every time, content-addressed by `corpus_hash`."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import pytest

from workers.activations.corpus import (
    CorpusError,
    CorpusHasher,
    CorpusSpec,
    Document,
    corpus_digest,
    corpus_hash,
    corpus_key,
    iter_documents,
    render_for_model,
    render_plain,
)
from workers.activations.data import make_builtin_corpus

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."}]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """A folder with a paragraph .txt file and a .jsonl file mixing plain and chat records."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("First paragraph,\nstill first.\n\n\nSecond paragraph.\n  \nThird.\n")
    write_jsonl(folder / "b.jsonl", [{"text": "A plain jsonl document."}, {"messages": CHAT},
                                     {"text": "Another one.", "meta": 3}])
    return folder


def texts(spec: CorpusSpec) -> list[str]:
    return [doc.text for doc in iter_documents(spec)]


# --- order, ids, parsing ---------------------------------------------------------------------------


def test_two_reads_give_the_same_documents_in_the_same_order(corpus_dir: Path) -> None:
    for spec in (CorpusSpec(), CorpusSpec.files(corpus_dir)):
        assert list(iter_documents(spec)) == list(iter_documents(spec))


def test_doc_ids_count_from_zero_in_stream_order(corpus_dir: Path) -> None:
    docs = list(iter_documents(CorpusSpec.files(corpus_dir)))
    assert [d.doc_id for d in docs] == list(range(len(docs)))


def test_txt_paragraphs_split_on_blank_lines_and_jsonl_follows_in_path_order(corpus_dir: Path) -> None:
    docs = list(iter_documents(CorpusSpec.files(corpus_dir)))
    assert [d.text for d in docs[:3]] == ["First paragraph,\nstill first.", "Second paragraph.", "Third."]
    assert docs[0].source.endswith("a.txt:1") and docs[1].source.endswith("a.txt:5")
    assert docs[3].text == "A plain jsonl document." and docs[3].source.endswith("b.jsonl:1")


def test_txt_file_mode_makes_one_document_per_file(corpus_dir: Path) -> None:
    docs = list(iter_documents(CorpusSpec.files(corpus_dir / "a.txt", txt_split="file")))
    assert len(docs) == 1 and docs[0].text.startswith("First") and docs[0].text.endswith("Third.")


def test_jsonl_text_and_messages_are_both_parsed(corpus_dir: Path) -> None:
    plain, chat, other = iter_documents(CorpusSpec.files(corpus_dir / "b.jsonl"))
    assert (plain.is_chat, plain.messages, plain.text) == (False, None, "A plain jsonl document.")
    assert chat.is_chat and chat.messages == CHAT
    assert chat.text == "System: Be brief.\nUser: What is 2 + 2?\nAssistant: 4."
    assert other.text == "Another one."


def test_custom_field_names_are_read(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"body": "x y"}, {"turns": CHAT[1:]}])
    docs = list(iter_documents(CorpusSpec.files(path, text_field="body", messages_field="turns")))
    assert [d.is_chat for d in docs] == [False, True]


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "broken\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:3: not valid JSON"):
        list(iter_documents(CorpusSpec.files(path)))


def test_record_without_text_or_messages_names_the_fields_it_has(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "odd.jsonl", [{"content": "x"}])
    with pytest.raises(CorpusError, match=r"odd\.jsonl:1: no string 'text' field.*\['content'\]"):
        list(iter_documents(CorpusSpec.files(path)))


def test_chat_turn_without_content_is_rejected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(CorpusError, match=r"chat\.jsonl:1: chat turn 0"):
        list(iter_documents(CorpusSpec.files(path)))


def test_non_utf8_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1\.txt: not UTF-8"):
        list(iter_documents(CorpusSpec.files(path)))


def test_empty_corpus_says_which_corpus_produced_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(CorpusError, match=r"corpus files\(.*empty\.txt\) produced no documents"):
        list(iter_documents(CorpusSpec.files(tmp_path / "empty.txt")))
    with pytest.raises(CorpusError, match=r"\[chat\] produced no documents"):
        list(iter_documents(CorpusSpec.files(tmp_path / "empty.txt", select="chat")))


def test_missing_path_and_unmatched_glob_are_errors(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        list(iter_documents(CorpusSpec.files(tmp_path / "nope.txt")))
    with pytest.raises(CorpusError, match="matched no"):
        list(iter_documents(CorpusSpec.files(str(tmp_path / "*.jsonl"))))


def test_invalid_specs_are_rejected_where_they_are_built() -> None:
    with pytest.raises(CorpusError, match="needs paths"):
        CorpusSpec(kind="files")
    with pytest.raises(CorpusError, match="max_docs"):
        CorpusSpec(kind="hf", hf_dataset="org/data")
    with pytest.raises(CorpusError, match="one positive weight per part"):
        CorpusSpec.mix((CorpusSpec(), 1.0), (CorpusSpec(), 0.0))
    with pytest.raises(CorpusError, match="select"):
        CorpusSpec(select="web")  # type: ignore[arg-type]


# --- limits and mixing -----------------------------------------------------------------------------


@pytest.mark.parametrize("max_docs", [1, 7, 100])
def test_max_docs_is_respected_and_keeps_the_prefix(max_docs: int) -> None:
    full = texts(CorpusSpec(max_docs=200))
    assert texts(CorpusSpec(max_docs=max_docs)) == full[:max_docs]


def test_max_chars_cuts_text_and_keeps_chat_turns_consistent(corpus_dir: Path) -> None:
    docs = list(iter_documents(CorpusSpec.files(corpus_dir, max_chars=20)))
    assert all(len(d.text) <= 20 for d in docs)
    chat = next(d for d in docs if d.is_chat)
    assert chat.messages is not None and chat.text == render_plain(chat.messages)
    assert chat.messages[0] == {"role": "system", "content": "Be brief."}


def test_select_keeps_only_the_requested_kind() -> None:
    assert all(d.is_chat for d in iter_documents(CorpusSpec(select="chat")))
    assert not any(d.is_chat for d in iter_documents(CorpusSpec(select="plain")))


def test_half_and_half_mix_stays_within_one_document_of_the_ratio_on_every_prefix() -> None:
    spec = CorpusSpec.mix((CorpusSpec(select="plain"), 0.5), (CorpusSpec(select="chat"), 0.5), max_docs=400)
    docs = list(iter_documents(spec))
    assert len(docs) == 400
    chats = list(itertools.accumulate(d.is_chat for d in docs))
    assert all(abs(n_chat - (i + 1) / 2) <= 1 for i, n_chat in enumerate(chats))


def test_weighted_mix_follows_its_weights_and_keeps_each_parts_order() -> None:
    plain, chat = CorpusSpec(select="plain"), CorpusSpec(select="chat")
    docs = list(iter_documents(CorpusSpec.mix((plain, 3), (chat, 1), max_docs=200)))
    chats = [d.text for d in docs if d.is_chat]
    assert abs(len(chats) - 50) <= 1
    assert chats == texts(CorpusSpec(select="chat", max_docs=len(chats)))


def test_mix_stops_when_a_part_runs_out_so_the_ratio_holds(corpus_dir: Path) -> None:
    two_docs = CorpusSpec.files(corpus_dir / "a.txt", max_docs=2)
    docs = list(iter_documents(CorpusSpec.mix((two_docs, 1), (CorpusSpec(), 1))))
    assert ["a.txt" in d.source for d in docs] == [True, False, True, False]


# --- hashing ---------------------------------------------------------------------------------------


def test_hash_is_the_same_for_every_spelling_of_the_same_files(corpus_dir: Path, monkeypatch) -> None:
    monkeypatch.chdir(corpus_dir.parent)
    spellings = [CorpusSpec.files(corpus_dir), CorpusSpec.files("corpus"), CorpusSpec.files("./corpus/"),
                 CorpusSpec.files("corpus/*.txt", "corpus/b.jsonl"), CorpusSpec.files("corpus/*"),
                 CorpusSpec.files(corpus_dir / "a.txt", "corpus/a.txt", "corpus/b.jsonl"),
                 CorpusSpec.from_dict({"kind": "files", "paths": str(corpus_dir), "max_docs": 1000})]
    assert len({corpus_hash(spec) for spec in spellings}) == 1


def test_hash_changes_when_one_character_changes(corpus_dir: Path) -> None:
    before = corpus_hash(CorpusSpec.files(corpus_dir))
    path = corpus_dir / "a.txt"
    path.write_text(path.read_text().replace("Third.", "Third!"))
    assert corpus_hash(CorpusSpec.files(corpus_dir)) != before


def test_hash_depends_on_order_and_on_chat_structure() -> None:
    a = Document(0, "User: hi", "x")
    b = Document(1, "User: hi", "y", is_chat=True, messages=[{"role": "user", "content": "hi"}])
    assert corpus_hash([a, b]) != corpus_hash([b, a])
    assert corpus_hash([a]) != corpus_hash([b])  # same plain text, but one is a conversation


def test_hash_of_a_spec_equals_hash_of_its_documents_whatever_their_ids_and_sources() -> None:
    spec = CorpusSpec(max_docs=50)
    docs = list(iter_documents(spec))
    relabelled = [Document(i + 1000, d.text, "elsewhere", d.is_chat, d.messages) for i, d in enumerate(docs)]
    assert corpus_hash(spec) == corpus_hash(docs) == corpus_hash(relabelled)
    hasher = CorpusHasher()
    for doc in docs:
        hasher.update(doc)
    assert hasher.result() == corpus_digest(spec) and hasher.result().n_docs == 50


def test_corpus_key_separates_chat_templates_from_plain_rendering() -> None:
    plain, templated = CorpusSpec(max_docs=5), CorpusSpec(max_docs=5, chat_format="template")
    assert corpus_key(plain) == corpus_hash(plain) and corpus_key(templated) != corpus_key(plain)


def test_spec_round_trips_through_its_json_form() -> None:
    spec = CorpusSpec.mix((CorpusSpec(select="plain"), 0.5), (CorpusSpec(select="chat"), 0.5), max_docs=9)
    assert CorpusSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(CorpusError, match="unknown corpus field"):
        CorpusSpec.from_dict({"kind": "builtin", "max_doc": 3})


# --- rendering for a model -------------------------------------------------------------------------


def tiny_tokenizer(chat_template: str | None):
    """A word-level PreTrainedTokenizerFast built in memory; nothing is downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", chat_template=chat_template)


TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
CHAT_DOC = Document(0, render_plain(CHAT), "test", is_chat=True, messages=CHAT)


def test_chat_document_uses_the_tokenizers_chat_template_when_it_has_one() -> None:
    rendered = render_for_model(CHAT_DOC, tiny_tokenizer(TEMPLATE))
    assert rendered == "<|system|>Be brief.<|end|><|user|>What is 2 + 2?<|end|><|assistant|>4.<|end|>"


def test_chat_document_falls_back_to_plain_text_without_a_template() -> None:
    expected = "System: Be brief.\nUser: What is 2 + 2?\nAssistant: 4."
    assert render_for_model(CHAT_DOC, tiny_tokenizer(None)) == expected
    assert render_for_model(CHAT_DOC, None) == CHAT_DOC.text


def test_plain_chat_format_gives_both_models_the_same_string() -> None:
    assert render_for_model(CHAT_DOC, tiny_tokenizer(TEMPLATE), chat_format="plain") == CHAT_DOC.text
    plain_doc = Document(0, "Just prose.", "test")
    assert render_for_model(plain_doc, tiny_tokenizer(TEMPLATE)) == "Just prose."


def test_a_template_that_rejects_the_conversation_suggests_plain_format() -> None:
    strict = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(CorpusError, match="chat_format='plain'"):
        render_for_model(CHAT_DOC, tiny_tokenizer(strict))


# --- Hugging Face streaming ------------------------------------------------------------------------


def test_hf_source_offline_says_it_could_not_reach_the_dataset_and_suggests_local_files(monkeypatch) -> None:
    if importlib.util.find_spec("datasets") is None:
        pytest.skip("the optional 'datasets' package is not installed")
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    spec = CorpusSpec.hf("HuggingFaceFW/fineweb", config="sample-10BT", max_docs=10)
    with pytest.raises(CorpusError, match=r"could not be reached.*local file corpus"):
        list(iter_documents(spec))


# --- the built-in corpus ---------------------------------------------------------------------------


def test_builtin_corpus_is_big_enough_for_a_demo_and_mixes_prose_chat_and_code() -> None:
    digest = corpus_digest(CorpusSpec())
    assert digest.n_docs >= 1500 and digest.n_chars >= 300_000
    docs = list(iter_documents(CorpusSpec()))
    assert sum(d.is_chat for d in docs) >= 300
    assert any("def " in d.text for d in docs) and any("SELECT" in d.text for d in docs)
    assert len({d.text for d in docs}) == len(docs)


def test_shipped_builtin_corpus_is_exactly_what_its_generator_writes() -> None:
    shipped = Path(make_builtin_corpus.OUTPUT).read_text(encoding="utf-8")
    assert make_builtin_corpus.render(make_builtin_corpus.build_records()) == shipped
