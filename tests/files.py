"""Test helpers that damage checkpoint files the way disks and downloads do."""
import struct
import zipfile


def damage_largest_member(path) -> str:
    """Overwrite 64 bytes inside the largest member of a zip archive (a tensor of a torch.save file): the archive
    still opens, and only its CRC tells. Returns the member's name."""
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda i: i.file_size)
    with open(path, 'r+b') as f:
        f.seek(member.header_offset + 26)
        name_len, extra_len = struct.unpack('<HH', f.read(4))
        f.seek(member.header_offset + 30 + name_len + extra_len + member.file_size // 2)
        f.write(bytes(64))
    return member.filename
