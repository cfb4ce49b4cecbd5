//! AES-256-GCM for many messages under one key and one associated data.
//!
//! Every v1 envelope sealed under a data key in a namespace carries the same associated data
//! (format tag, namespace, kek id, data key id: ~90 bytes, six GHASH blocks), and on a 1 KiB
//! payload GHASH-ing it is ~10 % of the cipher's work. GHASH absorbs the associated data before
//! the ciphertext, so its state after the associated data depends on nothing but the key and
//! those bytes: [`FixedAadGcm`] computes it once (when a data key is rotated in for sealing, or
//! resolved to open a response) and starts every message from a copy.
//! The rest is AES-GCM exactly as `aes-gcm` 0.10 builds it from the same crates (`aes`, `ctr`,
//! `ghash`); the tests hold it to `aes_gcm::Aes256Gcm` byte for byte, tag for tag.

use std::sync::Arc;

use aes::cipher::inout::InOutBuf;
use aes::cipher::{BlockEncrypt, InnerIvInit, KeyInit, StreamCipherCore};
use aes::Aes256;
use ghash::universal_hash::UniversalHash;
use ghash::GHash;
use subtle::ConstantTimeEq;

use super::envelope::TAG_LEN;

/// The longest plaintext GCM allows (NIST SP 800-38D): 2^39 - 256 bits.
const P_MAX: u64 = (1 << 36) - 32;

type Block = ghash::Block;
/// A 96-bit nonce, as `aes-gcm` types it.
pub(crate) type GcmNonce = aes_gcm::Nonce<aes_gcm::aead::consts::U12>;
type Ctr32BE<'a> = ctr::CtrCore<&'a Aes256, ctr::flavors::Ctr32BE>;

/// An unwrapped data key: its AES key schedule and GHASH keyed with H = AES(0), computed once.
pub(crate) struct DataKey {
    aes: Aes256,
    ghash: GHash,
}

impl DataKey {
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        let aes = Aes256::new(&(*key).into());
        let mut h = ghash::Key::default();
        aes.encrypt_block(&mut h);
        let ghash = GHash::new(&h);
        zeroize::Zeroize::zeroize(h.as_mut_slice());
        DataKey { aes, ghash }
    }

    /// AES-GCM under this key for messages whose associated data is `aad` (v1 envelopes: one
    /// per key and namespace, kept; v2 envelopes record each payload's size in theirs, so one
    /// per payload).
    pub(crate) fn with_fixed_aad(self: &Arc<Self>, aad: &[u8]) -> FixedAadGcm {
        let mut after_aad = self.ghash.clone();
        after_aad.update_padded(aad);
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
    /// GHASH keyed with H = AES(0), after absorbing the associated data (zero-padded).
    after_aad: GHash,
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
        let mut ghash = self.after_aad.clone();
        ghash.update_padded(ciphertext);
        let mut lengths = Block::default();
        lengths[..8].copy_from_slice(&self.aad_bits.to_be_bytes());
        lengths[8..].copy_from_slice(&(ciphertext.len() as u64 * 8).to_be_bytes());
        ghash.update(&[lengths]);
        let mut tag = ghash.finalize();
        for (t, m) in tag.iter_mut().zip(mask.iter()) {
            *t ^= m;
        }
        tag
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
        if ciphertext.len() as u64 > P_MAX || tag.len() != TAG_LEN {
            return Err(GcmError);
        }
        let (ctr, mask) = self.start(nonce);
        let expected = self.tag(&mask, ciphertext);
        if !bool::from(expected.as_slice().ct_eq(tag)) {
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Sealing gives what `aes-gcm` gives; each opens the other's; any changed bit of
        /// ciphertext or tag, another nonce or another associated data is refused, the
        /// buffer untouched.
        #[test]
        fn agrees_with_aes_gcm(
            key in any::<[u8; 32]>(),
            nonce in any::<[u8; 12]>(),
            aad in proptest::collection::vec(any::<u8>(), 0..100),
            plaintext in proptest::collection::vec(any::<u8>(), 0..200),
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
