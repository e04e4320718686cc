from qlora_platform.data.sample import build_sample_records, clean_doc, split_signature


def test_prose_is_unwrapped_and_reference_furniture_dropped():
    doc = (
        "Serialize ``obj`` to a JSON formatted\n:class:`str` (see section Encoders).\n\n"
        "Title\n=====\n\n"
        "stmt ::= expr\n\n"
        "See also: the json module.\n\n"
        "Changed in version 3.6: all optional parameters are keyword-only.\n\n"
        "The heap is such that a[0] is the smallest.[1]  It stays so."
    )
    assert clean_doc(doc) == (
        "Serialize `obj` to a JSON formatted `str`.\n\nThe heap is such that a[0] is the smallest. It stays so."
    )


def test_lists_keep_one_item_a_line_and_tables_keep_their_columns():
    doc = (
        "Optional keyword arguments:\nsep\n  string inserted between values.\nend\n  string appended.\n\n"
        "* If the target is a name,\n  it is bound.\n* Otherwise it fails.\n\n"
        "Pattern  Meaning\n*        matches everything\n?        matches one character"
    )
    assert clean_doc(doc).split("\n\n") == [
        "Optional keyword arguments:\nsep: string inserted between values.\nend: string appended.",
        "* If the target is a name, it is bound.\n* Otherwise it fails.",
        "Pattern  Meaning\n*        matches everything\n?        matches one character",
    ]


def test_one_short_example_is_kept_dedented_and_long_listings_go_with_their_intro():
    doc = (
        "Return the sum.\n\nFor example:\n\n    >>> add(1, 2)\n    3\n\n"
        "Another one:\n\n    >>> add(2, 2)\n    4\n\nThe end."
    )
    assert clean_doc(doc) == "Return the sum.\n\nFor example:\n\n>>> add(1, 2)\n3\n\nThe end."
    long_block = "\n".join(f"    line_{i} = {i}" for i in range(8))
    doc = f"A function defined in a module with many words before its long listing is equivalent to:\n\n{long_block}"
    assert clean_doc(doc) == "A function defined in a module with many words before its long listing is equivalent to."
    doc = f"Defines things. Typical usage:\n\n{long_block}\n\nDone."
    assert clean_doc(doc) == "Defines things.\n\nDone."
    # A long doctest is cut before the statement that would pass the limit.
    doctest = ">>> a = 1\n>>> b = 2\n>>> a + b\n3\n>>> a - b\n-1"
    assert clean_doc(doctest) == ">>> a = 1\n>>> b = 2\n>>> a + b\n3"


def test_the_sample_set_keeps_its_size_and_no_answer_carries_grammar_or_wrapped_lines():
    records = build_sample_records()
    assert len(records) >= 1200
    answers = {r["source"]: r["messages"][-1]["content"] for r in records}
    assert not any("::=" in a for a in answers.values())
    assert not any(" at 0x" in a for a in answers.values())  # no memory address: the same set in every process
    # The benchmark's objects keep their pairs.
    for source in ("collections.html#collections.namedtuple", "itertools.html#itertools.groupby"):
        assert source in answers
    dumps = answers["json.html#json.dumps"]
    assert "Serialize `obj` to a JSON formatted `str`." in dumps and "\nfor container" not in dumps
    # Prose first, the signature last: the answer opens with what the object does.
    assert dumps.startswith("Serialize `obj`") and split_signature(dumps)[1].startswith("json.dumps(obj, *, skipkeys")
    with_signature = [r for r in records if split_signature(r["messages"][-1]["content"])[1]]
    assert {r["category"] for r in with_signature} == {"function", "method", "class"}
    assert not any(
        r["messages"][-1]["content"].startswith(f"`{split_signature(r['messages'][-1]['content'])[1]}")
        for r in with_signature
    )


def test_signatures_carry_no_memory_address(tmp_path):
    """Defaults without their own repr print with an address that changes in every process."""
    import re
    import weakref

    from qlora_platform.data.sample import _signature, write_sample_documents

    sentinel = object()
    ref = weakref.ref(test_signatures_carry_no_memory_address)

    def f(a=sentinel, b=ref, c=None):
        pass

    assert (
        _signature(f)
        == "(a=<object object>, b=<weakref; to 'function' (test_signatures_carry_no_memory_address)>, c=None)"
    )
    lines = [line for page in write_sample_documents(tmp_path) for line in page.read_text().splitlines()]
    assert not [line for line in lines if line.startswith("<p><code>") and re.search(r" at 0x[0-9a-f]+", line)]
