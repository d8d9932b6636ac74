"""The frame codec against the hex examples of chatter-core PROTOCOL.md."""

import pytest

from chatter import frames as F


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def test_hello_with_default_settings():  # §12.1
    assert F.hello_frame(4194304, 8388608) == h(
        "00 00 00 15 95 00 a7 63 68 61 74 74 65 72 01 ce 00 40 00 00 ce 00 80 00 00"
    )


def test_one_shot_message():  # §12.2
    frame, n = F.message_frame(1, 1, 7, h("a2 68 69"))
    assert frame == h("00 00 00 08 94 01 01 01 07 a2 68 69") and n == 8


def test_request_and_reply_with_wide_ids():  # §12.3
    assert F.message_frame(130, 130, 3, h("92 a4 65 63 68 6f a2 68 69"))[0] == h(
        "00 00 00 10 94 01 cc 82 cc 82 03 92 a4 65 63 68 6f a2 68 69"
    )
    assert F.message_frame(300, 130, 6, h("a2 68 69"))[0] == h("00 00 00 0b 94 01 cd 01 2c cc 82 06 a2 68 69")


def test_ping_pong_window_close():  # §12.5-§12.7
    assert F.PING_FRAME == h("00 00 00 02 91 02")
    assert F.PONG_FRAME == h("00 00 00 02 91 03")
    assert F.window_frame(12) == h("00 00 00 03 92 04 0c")
    assert F.window_frame(2097152) == h("00 00 00 07 92 04 ce 00 20 00 00")
    assert F.close_frame(3, "server closing", 1 << 20) == h(
        "00 00 00 12 93 05 03 ae 73 65 72 76 65 72 20 63 6c 6f 73 69 6e 67"
    )
    reason = "message id 3 where 2 was expected"
    assert F.close_frame(1, reason, 1 << 20) == h("00 00 00 26 93 05 01 d9 21") + reason.encode()


@pytest.mark.parametrize(
    "body,kind,fields,payload",
    [  # §12.8
        ("94 01 cf 00 00 00 00 00 00 00 01 cc 01 cd 00 07 a2 68 69", 1, [1, 1, 7], "a2 68 69"),
        ("95 01 01 01 07 a3 66 6f 6f a2 68 69", 1, [1, 1, 7], "a2 68 69"),
        ("92 02 c0", 2, [], ""),
        ("dc 00 01 02", 2, [], ""),
    ],
)
def test_decoders_accept(body, kind, fields, payload):
    b = h(body)
    k, f, end = F.decode_header(b)
    assert (k, f, b[end:]) == (kind, fields, h(payload))


@pytest.mark.parametrize(
    "body,error",
    [
        ("91 02 00", "1 bytes after the header"),
        ("94 01 d0 01 01 07", r"signed integer \(marker 0xd0\)"),
        ("91 06", "unknown frame kind 6"),
        ("90", "empty frame header"),
        ("92 04", "truncated"),
        ("93 05 00 a2 ff fe", "invalid UTF-8"),
        ("92 02 " + "91 " * 20 + "c0", "nested"),
        ("92 02 c1", "0xc1"),
    ],
)
def test_decoders_reject(body, error):
    with pytest.raises(F.Malformed, match=error):
        F.decode_header(h(body))


def test_unknown_flag_bit_is_left_to_the_connection():
    # "94 01 01 01 08": the header decodes; the connection rejects flag 0x08 (see
    # test_protocol.py for the end-to-end check of malformed frames).
    assert F.decode_header(h("94 01 01 01 08"))[1] == [1, 1, 8]


def test_complete_exchange_request():  # §13
    frame, _ = F.message_frame(1, 1, 3, h("93 a3 61 64 64 02 03"))
    assert frame == h("00 00 00 0c 94 01 01 01 03 93 a3 61 64 64 02 03")
    assert F.close_frame(0, "closed by peer application", 1 << 20) == h(
        "00 00 00 1e 93 05 00 ba 63 6c 6f 73 65 64 20 62 79 20 70 65 65 72 20 61 70 70 6c 69 63 61 74 69 6f 6e"
    )
