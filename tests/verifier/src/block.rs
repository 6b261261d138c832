//! The self-describing block format.
//!
//! Every 4 KiB block says what it is: magic, volume tag, sequence number,
//! block index and a checksum of its payload. A verifier can thus tell a
//! correct block from a stale one, a misplaced one, a torn one or zeros,
//! without any state other than the writer's log.

pub const BLOCK_SIZE: usize = 4096;
const MAGIC: u64 = u64::from_le_bytes(*b"LDVERIF1");
const HEADER: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u64,
    pub seq: u64,
    pub block: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("block is all zeros (never written)")]
    Zero,
    #[error("bad magic")]
    BadMagic,
    #[error("checksum mismatch (torn or corrupt write)")]
    Checksum,
}

/// FNV-1a, 64 bit: not cryptographic, only detects corruption.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Payload derived from the header so two writes never look alike.
fn fill_payload(h: &Header, out: &mut [u8]) {
    let mut x = h.seq ^ h.block.rotate_left(32) ^ h.tag.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15;
    for chunk in out.chunks_mut(8) {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

pub fn encode(h: &Header) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK_SIZE];
    fill_payload(h, &mut buf[HEADER..]);
    let sum = fnv1a(&buf[HEADER..]);
    for (i, v) in [MAGIC, h.tag, h.seq, h.block, sum].iter().enumerate() {
        buf[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    buf
}

fn word(buf: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[i * 8..i * 8 + 8]);
    u64::from_le_bytes(b)
}

pub fn decode(buf: &[u8]) -> Result<Header, BlockError> {
    if buf.len() < BLOCK_SIZE {
        return Err(BlockError::BadMagic);
    }
    if buf.iter().all(|b| *b == 0) {
        return Err(BlockError::Zero);
    }
    if word(buf, 0) != MAGIC {
        return Err(BlockError::BadMagic);
    }
    if word(buf, 4) != fnv1a(&buf[HEADER..BLOCK_SIZE]) {
        return Err(BlockError::Checksum);
    }
    Ok(Header {
        tag: word(buf, 1),
        seq: word(buf, 2),
        block: word(buf, 3),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let h = Header {
            tag: 7,
            seq: 42,
            block: 3,
        };
        let mut b = encode(&h);
        assert_eq!(decode(&b), Ok(h));
        b[1000] ^= 1;
        assert_eq!(decode(&b), Err(BlockError::Checksum));
        assert_eq!(decode(&[0u8; BLOCK_SIZE]), Err(BlockError::Zero));
        assert_eq!(decode(&[1u8; BLOCK_SIZE]), Err(BlockError::BadMagic));
    }
}
