"""errors.read_file: the one helper that reads a user-named host file (image, initrd, module,
fw_cfg blob); its errors name the file, what it is, and the OS's reason."""
import os

import pytest

from kvmpy.errors import DeviceError, KvmpyError, LoaderError, read_file


def test_reads_a_path_given_as_str_or_pathlike(tmp_path):
    p = tmp_path / "k.bin"
    p.write_bytes(b"\x7fELF...")
    assert read_file(p, "image") == b"\x7fELF..."
    assert read_file(str(p), "image") == b"\x7fELF..."


@pytest.mark.parametrize("data", [b"abc", bytearray(b"abc"), memoryview(b"abc")])
def test_bytes_like_is_returned_as_bytes(data):
    out = read_file(data, "initrd")
    assert out == b"abc" and type(out) is bytes


def test_missing_file_names_the_file_and_what_it_is(tmp_path):
    missing = tmp_path / "x"
    with pytest.raises(LoaderError) as e:
        read_file(missing, "initrd")
    assert str(e.value) == f"cannot read initrd '{missing}': No such file or directory"
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_a_directory_is_refused_with_the_os_reason(tmp_path):
    with pytest.raises(LoaderError, match=r"cannot read module '.*': Is a directory"):
        read_file(tmp_path, "module")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_permission_denied_is_reported(tmp_path):
    p = tmp_path / "secret"
    p.write_bytes(b"x")
    p.chmod(0)
    with pytest.raises(LoaderError, match=r"cannot read image '.*secret': Permission denied"):
        read_file(p, "image")


def test_the_error_class_is_the_callers_choice(tmp_path):
    with pytest.raises(DeviceError, match=r"cannot read fw_cfg file 'opt/x' '.*nope'"):
        read_file(tmp_path / "nope", "fw_cfg file 'opt/x'", error=DeviceError)


def test_neither_path_nor_bytes_is_a_type_error():
    with pytest.raises(TypeError, match="initrd must be a path or bytes, not int"):
        read_file(3, "initrd")


def test_errors_are_kvmpy_errors(tmp_path):
    with pytest.raises(KvmpyError):
        read_file(tmp_path / "nope", "image")
