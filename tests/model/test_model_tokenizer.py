from model import EOT_TOKEN, TextStream


def test_gpt2_bpe_ids_and_round_trip(tokenizer):
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.eot_token == EOT_TOKEN == 50256
    assert tokenizer.vocab_size == 50257
    text = "First Citizen:\nBefore we proceed any further, hear me speak. ☃ 😀"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_literal_end_of_text_in_user_text_is_plain_text(tokenizer):
    tokens = tokenizer.encode("a <|endoftext|> b")
    assert EOT_TOKEN not in tokens
    assert tokenizer.decode(tokens) == "a <|endoftext|> b"


def _stream(tokenizer, tokens, stop=()):
    stream = TextStream(tokenizer, stop)
    deltas = []
    for t in tokens:
        deltas.append(stream.push(t))
        if stream.stopped:
            return deltas, stream
    deltas.append(stream.finish())
    return deltas, stream


def test_characters_split_over_tokens_are_held_back_until_complete(tokenizer):
    text = "ok 😀🎉 done"
    tokens = tokenizer.encode(text)
    assert len(tokens) > len(text.split())  # the emoji really are split over several tokens
    deltas, _ = _stream(tokenizer, tokens)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    assert "" in deltas  # some token released nothing: it held half a character


def test_an_incomplete_character_at_the_end_becomes_a_replacement(tokenizer):
    first_half = tokenizer.encode("😀")[:1]
    deltas, _ = _stream(tokenizer, first_half)
    assert "".join(deltas) == "\ufffd"


def test_stop_string_cuts_the_text_and_the_tail_that_might_stop_is_held(tokenizer):
    tokens = tokenizer.encode("one two\n\nthree")
    deltas, stream = _stream(tokenizer, tokens, stop=("\n\n",))
    assert stream.stopped
    assert "".join(deltas) == "one two"
    assert all("\n" not in d for d in deltas)


def test_a_stop_string_spanning_tokens_is_found(tokenizer):
    tokens = tokenizer.encode("the cat sat on the mat")
    deltas, stream = _stream(tokenizer, tokens, stop=("t on t",))
    assert stream.stopped
    assert "".join(deltas) == "the cat sa"


def test_held_text_that_does_not_become_a_stop_is_released(tokenizer):
    tokens = tokenizer.encode("a\nb\nc")
    deltas, stream = _stream(tokenizer, tokens, stop=("\n\n",))
    assert not stream.stopped
    assert "".join(deltas) == "a\nb\nc"
