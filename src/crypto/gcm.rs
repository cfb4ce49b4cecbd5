//! AES-256-GCM for many messages under one key and one associated data.
//!
//! Every v1 envelope sealed under a data key in a namespace carries the same associated data
//! (format tag, namespace, kek id, data key id: ~90 bytes, six GHASH blocks), and on a 1 KiB
//! payload GHASH-ing it is ~10 % of the cipher's work. GHASH absorbs the associated data before
//! the ciphertext, so its state after the associated data depends on nothing but the key and
//! those bytes: [`FixedAadGcm`] computes it once (when a data key is rotated in for sealing, or
//! resolved to open a response) and starts every message from a copy.
//!
//! GHASH is Horner's rule over GF(2^128), `y = (y ^ block) * H` per block, so each block waits
//! for the one before: the carry-less multiply and its reduction are a chain of dependent
//! instructions, and the CPU idles between them. [`GhashKey`] hashes longer inputs in
//! [`LANES`] interleaved chains keyed with H^LANES that run side by side, each multiplied at
//! the end by the power of H its blocks are still owed. The arithmetic is `polyval`'s (GHASH
//! is POLYVAL with bytes reversed and H multiplied by x, RFC 8452 appendix A; `ghash` does the
//! same), which uses the CPU's carry-less multiply where it has one.
//! The rest is AES-GCM as `aes-gcm` 0.10 builds it from the same crates (`aes`, `ctr`); the
//! tests hold it to `aes_gcm::Aes256Gcm` byte for byte, tag for tag.

use std::sync::Arc;

use aes::cipher::inout::InOutBuf;
use aes::cipher::{BlockEncrypt, InnerIvInit, KeyInit, StreamCipherCore};
use aes::Aes256;
use polyval::universal_hash::UniversalHash;
use polyval::Polyval;
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use super::envelope::TAG_LEN;

/// The longest plaintext GCM allows (NIST SP 800-38D): 2^39 - 256 bits.
const P_MAX: u64 = (1 << 36) - 32;

type Block = polyval::Block;
/// A 96-bit nonce, as `aes-gcm` types it.
pub(crate) type GcmNonce = aes_gcm::Nonce<aes_gcm::aead::consts::U12>;
type Ctr32BE<'a> = ctr::CtrCore<&'a Aes256, ctr::flavors::Ctr32BE>;

/// How many chains hash a long input side by side.
const LANES: usize = 2;
/// Inputs of fewer blocks are hashed in one chain: the joins would cost more than they save.
const LANES_FROM_BLOCKS: usize = 4 * LANES;
// The padded block and the lengths block both fit in the lanes' last group.
const _: () = assert!(LANES >= 2);

/// GHASH's key: H, H^2, .., H^LANES, each as POLYVAL takes it. Zeroized when dropped.
struct GhashKey {
    powers: [Block; LANES],
}

/// GHASH's input block `block` in POLYVAL's byte order (reversed). Kept in a byte array, not
/// an integer: the multiply loads it as one 16-byte vector, which a store of two 8-byte halves
/// cannot forward to (a stall per block, measured: 64 KiB opened 70 % slower).
fn ghash_input(block: &[u8; 16]) -> Block {
    let mut reversed = Block::from(*block);
    reversed.reverse();
    reversed
}

/// Whether the tags are equal, in constant time: their XOR, its two 64-bit halves ORed,
/// compared with zero once (comparing the slices byte by byte costs 16 of `subtle`'s
/// optimization barriers; that was ~0.8 % of opening a page).
fn tags_match(expected: &Block, tag: &[u8; TAG_LEN]) -> bool {
    let expected: [u8; 16] = (*expected).into();
    let difference = u128::from_ne_bytes(expected) ^ u128::from_ne_bytes(*tag);
    let folded = (difference as u64) | ((difference >> 64) as u64);
    bool::from(folded.ct_eq(&0))
}

fn xor(a: &Block, b: &Block) -> Block {
    Block::from(std::array::from_fn::<u8, 16, _>(|i| a[i] ^ b[i]))
}

/// The product of two field elements as POLYVAL multiplies them (its `dot`: commutative and
/// associative, so powers of H compose).
fn multiply(a: &Block, b: &Block) -> Block {
    let mut hash = Polyval::new(b);
    hash.update(&[*a]);
    hash.finalize()
}

impl GhashKey {
    fn new(h: &Block) -> Self {
        let mut reversed = *h;
        reversed.reverse();
        let mut powers = [polyval::mulx(&reversed); LANES];
        reversed.zeroize();
        for k in 1..LANES {
            powers[k] = multiply(&powers[k - 1], &powers[0]);
        }
        GhashKey { powers }
    }

    /// GHASH's state after absorbing `data` (its last block zero-padded), then `last` if
    /// given, starting from state `y`. A chain starts from zero, so `y` is folded into the
    /// first block absorbed.
    fn absorb(&self, y: &Block, data: &[u8], last: Option<&[u8; 16]>) -> Block {
        let (blocks, rest) = data.as_chunks::<16>();
        let mut extra = [[0u8; 16]; 2];
        let mut extras = 0;
        if !rest.is_empty() {
            extra[0][..rest.len()].copy_from_slice(rest);
            extras = 1;
        }
        if let Some(last) = last {
            extra[extras] = *last;
            extras += 1;
        }
        let extra = &extra[..extras];
        if blocks.len() >= LANES_FROM_BLOCKS {
            return self.lanes(y, blocks, extra);
        }
        let mut chain = Polyval::new(&self.powers[0]);
        let mut fold = *y;
        let mut absorbed = false;
        for block in blocks.iter().chain(extra) {
            chain.update(&[xor(&ghash_input(block), &fold)]);
            (fold, absorbed) = (Block::default(), true);
        }
        match absorbed {
            true => chain.finalize(),
            false => *y,
        }
    }

    /// `blocks` (at least `LANES_FROM_BLOCKS`) then `extra` (at most `LANES`), `y` folded
    /// into the first, in `LANES` chains keyed with H^LANES.
    ///
    /// The blocks are cut into groups of `LANES`, the first group short if it must be (as if
    /// front-padded with zero blocks, which leave a zero state zero); chain j takes block j of
    /// every group but the last, so each of its blocks is owed H^(LANES - j) more than its
    /// chain gave it. The last group pays that: chain j's state, XOR its block of the last
    /// group, times H^(LANES - j), summed over j. Those multiplies are independent too.
    fn lanes(&self, y: &Block, blocks: &[[u8; 16]], extra: &[[u8; 16]]) -> Block {
        let head = match (blocks.len() + extra.len()) % LANES {
            0 => LANES,
            short => short,
        };
        let (first_group, rest) = blocks.split_at(head);
        let from_blocks_in_last_group = LANES.saturating_sub(extra.len());
        let (middle, last_of_blocks) =
            rest.split_at(rest.len().saturating_sub(from_blocks_in_last_group));
        let mut chains: [Polyval; LANES] =
            std::array::from_fn(|_| Polyval::new(&self.powers[LANES - 1]));
        let mut fold = *y;
        for (chain, block) in chains[LANES - head..].iter_mut().zip(first_group) {
            chain.update(&[xor(&ghash_input(block), &fold)]);
            fold = Block::default();
        }
        for group in middle.chunks_exact(LANES) {
            for (chain, block) in chains.iter_mut().zip(group) {
                chain.update(&[ghash_input(block)]);
            }
        }
        // Finishing a clone, not the chain itself: moving `Polyval`s out of the array copies
        // them through misaligned stack slots the next load cannot be forwarded from.
        let last_group = last_of_blocks.iter().chain(extra);
        let mut sum = Block::default();
        for (j, (chain, block)) in chains.iter().zip(last_group).enumerate() {
            let owed = xor(&chain.clone().finalize(), &ghash_input(block));
            sum = xor(&sum, &multiply(&owed, &self.powers[LANES - 1 - j]));
        }
        sum
    }
}

impl Drop for GhashKey {
    fn drop(&mut self) {
        self.powers.iter_mut().for_each(|power| power.zeroize());
    }
}

/// An unwrapped data key: its AES key schedule and GHASH's key H = AES(0) with its powers,
/// computed once.
pub(crate) struct DataKey {
    aes: Aes256,
    ghash: GhashKey,
}

impl DataKey {
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        let aes = Aes256::new(&(*key).into());
        let mut h = Block::default();
        aes.encrypt_block(&mut h);
        let ghash = GhashKey::new(&h);
        h.zeroize();
        DataKey { aes, ghash }
    }

    /// AES-GCM under this key for messages whose associated data is `aad` (v1 envelopes: one
    /// per key and namespace, kept; v2 envelopes record each payload's size in theirs, so one
    /// per payload).
    pub(crate) fn with_fixed_aad(self: &Arc<Self>, aad: &[u8]) -> FixedAadGcm {
        let after_aad = self.ghash.absorb(&Block::default(), aad, None);
        FixedAadGcm {
            key: Arc::clone(self),
            after_aad,
            aad_bits: (aad.len() as u64).saturating_mul(8),
        }
    }
}

/// AES-256-GCM under one key for messages that all carry the same associated data.
pub(crate) struct FixedAadGcm {
    key: Arc<DataKey>,
    /// GHASH's state after absorbing the associated data (zero-padded).
    after_aad: Block,
    aad_bits: u64,
}

/// The message is longer than GCM allows, or did not authenticate.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct GcmError;

impl FixedAadGcm {
    /// The key, for messages under it with other associated data.
    pub(crate) fn data_key(&self) -> &Arc<DataKey> {
        &self.key
    }

    /// The counter at J0 = nonce || 1, and the keystream block there, which masks the tag;
    /// the returned counter continues at J0 + 1, where the message's keystream begins.
    fn start(&self, nonce: &GcmNonce) -> (Ctr32BE<'_>, Block) {
        let mut j0 = Block::default();
        j0[..12].copy_from_slice(nonce);
        j0[15] = 1;
        let mut ctr = Ctr32BE::inner_iv_init(&self.key.aes, &j0);
        let mut mask = Block::default();
        ctr.write_keystream_block(&mut mask);
        (ctr, mask)
    }

    fn tag(&self, mask: &Block, ciphertext: &[u8]) -> Block {
        let mut lengths = [0u8; 16];
        lengths[..8].copy_from_slice(&self.aad_bits.to_be_bytes());
        lengths[8..].copy_from_slice(&(ciphertext.len() as u64 * 8).to_be_bytes());
        let mut y = self
            .key
            .ghash
            .absorb(&self.after_aad, ciphertext, Some(&lengths));
        y.reverse();
        xor(&y, mask)
    }

    /// Appends the encryption of `plaintext`, then its tag, to `out` (encrypted from where it
    /// lies into `out`: no copy of the plaintext first). On failure `out` is left as it was.
    pub(crate) fn encrypt_to(
        &self,
        nonce: &GcmNonce,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), GcmError> {
        if plaintext.len() as u64 > P_MAX {
            return Err(GcmError);
        }
        let (ctr, mask) = self.start(nonce);
        let start = out.len();
        out.resize(start + plaintext.len(), 0);
        let tag = out
            .get_mut(start..)
            .and_then(|ciphertext| InOutBuf::new(plaintext, ciphertext).ok())
            .map(|buffer| ctr.apply_keystream_partial(buffer))
            .and_then(|()| out.get(start..))
            .map(|ciphertext| self.tag(&mask, ciphertext));
        match tag {
            Some(tag) => {
                out.extend_from_slice(&tag);
                Ok(())
            }
            None => {
                out.truncate(start);
                Err(GcmError)
            }
        }
    }

    /// Checks `tag` over `ciphertext`, then appends its decryption to `out` (decrypted from
    /// where it lies into `out`: no copy of the ciphertext first). On failure `out` is left as
    /// it was: nothing unauthenticated is decrypted.
    pub(crate) fn decrypt_to(
        &self,
        nonce: &GcmNonce,
        ciphertext: &[u8],
        tag: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), GcmError> {
        let Ok(tag) = <&[u8; TAG_LEN]>::try_from(tag) else {
            return Err(GcmError);
        };
        if ciphertext.len() as u64 > P_MAX {
            return Err(GcmError);
        }
        let (ctr, mask) = self.start(nonce);
        let expected = self.tag(&mask, ciphertext);
        if !tags_match(&expected, tag) {
            return Err(GcmError);
        }
        let start = out.len();
        out.resize(start + ciphertext.len(), 0);
        let decrypted = out
            .get_mut(start..)
            .and_then(|plaintext| InOutBuf::new(ciphertext, plaintext).ok())
            .map(|buffer| ctr.apply_keystream_partial(buffer));
        if decrypted.is_none() {
            out.truncate(start);
            return Err(GcmError);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use aes_gcm::aead::{AeadInPlace, Tag};
    use aes_gcm::Aes256Gcm;
    use proptest::prelude::*;

    use super::*;

    fn reference(key: &[u8; 32]) -> Aes256Gcm {
        Aes256Gcm::new_from_slice(key).unwrap()
    }

    /// The GCM specification's test case 16 (AES-256, 96-bit IV, 20 bytes of AAD, 60 bytes of
    /// plaintext: partial blocks on both).
    #[test]
    fn matches_the_gcm_specification() {
        let hex = |s: &str| {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect::<Vec<u8>>()
        };
        let key: [u8; 32] = hex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
            .try_into()
            .unwrap();
        let nonce = *GcmNonce::from_slice(&hex("cafebabefacedbaddecaf888"));
        let aad = hex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let plaintext = hex(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
             1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        );
        let ciphertext = hex(
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
             8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
        );
        let tag = hex("76fc6ece0f4e1768cddf8853bb2d551b");
        let gcm = Arc::new(DataKey::new(&key)).with_fixed_aad(&aad);
        let mut sealed = b"before".to_vec();
        gcm.encrypt_to(&nonce, &plaintext, &mut sealed).unwrap();
        assert_eq!(sealed, [b"before".as_slice(), &ciphertext, &tag].concat());
        let mut opened = b"before".to_vec();
        gcm.decrypt_to(&nonce, &ciphertext, &tag, &mut opened)
            .unwrap();
        assert_eq!(opened, [b"before".as_slice(), &plaintext].concat());
    }

    #[test]
    fn refuses_a_wrong_tag_length_and_leaves_the_buffer_alone() {
        let gcm = Arc::new(DataKey::new(&[1; 32])).with_fixed_aad(b"aad");
        let nonce = GcmNonce::from([2; 12]);
        let mut buffer = Vec::new();
        gcm.encrypt_to(&nonce, b"some plaintext", &mut buffer)
            .unwrap();
        let tag = buffer.split_off(buffer.len() - TAG_LEN);
        for bad in [&tag[..15], &[], &[tag.as_slice(), &[0]].concat()[..]] {
            let mut out = b"before".to_vec();
            assert_eq!(
                gcm.decrypt_to(&nonce, &buffer, bad, &mut out),
                Err(GcmError)
            );
            assert_eq!(out, b"before");
        }
    }

    /// The edges of GHASH's paths: nothing, a partial block only, whole blocks only, just under
    /// and over where the lanes begin, every lane count's remainder, and large inputs; sealed
    /// as `aes-gcm` seals, opened, and refused with a forged tag.
    #[test]
    fn agrees_with_aes_gcm_at_every_edge_of_the_lanes() {
        let key = [7u8; 32];
        let nonce = GcmNonce::from([9; 12]);
        let lanes_from = LANES_FROM_BLOCKS * 16;
        let mut sizes = vec![0, 1, 15, 16, 17, 33, lanes_from - 16, lanes_from - 1];
        sizes.extend((0..=LANES * 16 + 1).map(|extra| lanes_from + extra));
        sizes.extend([4096 + 5, 65536 + 3]);
        for &aad_len in &[0, 1, 16, 17, lanes_from - 1, lanes_from, lanes_from + 17] {
            let aad: Vec<u8> = (0..aad_len).map(|i| (i * 7) as u8).collect();
            let ours = Arc::new(DataKey::new(&key)).with_fixed_aad(&aad);
            for &len in &sizes {
                let plaintext: Vec<u8> = (0..len).map(|i| (i * 13 + 1) as u8).collect();
                let mut sealed = Vec::new();
                ours.encrypt_to(&nonce, &plaintext, &mut sealed).unwrap();
                let mut expected = plaintext.clone();
                let tag = reference(&key)
                    .encrypt_in_place_detached(&nonce, &aad, &mut expected)
                    .unwrap();
                expected.extend_from_slice(&tag);
                assert_eq!(sealed, expected, "aad {aad_len} bytes, plaintext {len}");
                let (ciphertext, tag) = sealed.split_at(len);
                let mut opened = b"before".to_vec();
                ours.decrypt_to(&nonce, ciphertext, tag, &mut opened)
                    .unwrap();
                assert_eq!(opened[6..], plaintext[..], "aad {aad_len}, plaintext {len}");
                let mut forged = tag.to_vec();
                forged[len % TAG_LEN] ^= 0x80;
                let mut refused = b"before".to_vec();
                assert_eq!(
                    ours.decrypt_to(&nonce, ciphertext, &forged, &mut refused),
                    Err(GcmError)
                );
                assert_eq!(refused, b"before");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Sealing gives what `aes-gcm` gives; each opens the other's; any changed bit of
        /// ciphertext or tag, another nonce or another associated data is refused, the
        /// buffer untouched.
        #[test]
        fn agrees_with_aes_gcm(
            key in any::<[u8; 32]>(),
            nonce in any::<[u8; 12]>(),
            // Up to 40 and 75 blocks: both through the one chain and the lanes, every padding.
            aad in proptest::collection::vec(any::<u8>(), 0..640),
            plaintext in proptest::collection::vec(any::<u8>(), 0..1200),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let ours = Arc::new(DataKey::new(&key)).with_fixed_aad(&aad);
            let theirs = reference(&key);
            let nonce = GcmNonce::from(nonce);
            let nonce_ref = &nonce;

            let mut sealed = Vec::new();
            ours.encrypt_to(&nonce, &plaintext, &mut sealed).unwrap();
            let tag = sealed.split_off(plaintext.len());
            let mut expected = plaintext.clone();
            let expected_tag = theirs
                .encrypt_in_place_detached(nonce_ref, &aad, &mut expected)
                .unwrap();
            prop_assert_eq!(&sealed, &expected);
            prop_assert_eq!(tag.as_slice(), expected_tag.as_slice());

            let mut opened = sealed.clone();
            theirs
                .decrypt_in_place_detached(nonce_ref, &aad, &mut opened, Tag::<Aes256Gcm>::from_slice(&tag))
                .unwrap();
            prop_assert_eq!(&opened, &plaintext);
            let mut opened = Vec::new();
            ours.decrypt_to(&nonce, &sealed, &tag, &mut opened).unwrap();
            prop_assert_eq!(&opened, &plaintext);

            // One bit flipped anywhere in ciphertext || tag.
            let mut tampered = [sealed.as_slice(), tag.as_slice()].concat();
            let at = flip.index(tampered.len());
            tampered[at] ^= 1 << bit;
            let (body, bad_tag) = tampered.split_at(sealed.len());
            let mut out = b"before".to_vec();
            prop_assert_eq!(ours.decrypt_to(&nonce, body, bad_tag, &mut out), Err(GcmError));
            prop_assert_eq!(&out, b"before");

            let mut other_nonce = nonce;
            other_nonce[at % 12] ^= 1 << bit;
            let mut out = Vec::new();
            prop_assert_eq!(ours.decrypt_to(&other_nonce, &sealed, &tag, &mut out), Err(GcmError));
            let mut other_aad = aad.clone();
            other_aad.push(0);
            let other = Arc::new(DataKey::new(&key)).with_fixed_aad(&other_aad);
            prop_assert_eq!(other.decrypt_to(&nonce, &sealed, &tag, &mut out), Err(GcmError));
            prop_assert!(out.is_empty());
        }
    }
}
