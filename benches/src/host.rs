//! What the host's processor can do, measured before the runs: the figures that decide how
//! close an encrypted mode can come to plaintext here.
//!
//! On two cores shared by both ends, every mode is bound by CPU seconds per byte, so a
//! TLS mode's ratio to plaintext is at most `plain / (plain + aead)`, where `aead` is the
//! cost of encrypting on one side and decrypting on the other. That cost varies several
//! fold between processors that all call themselves "AMD EPYC" (with or without VAES), so
//! every report records the model and a one-core AES-GCM and memcpy rate measured in the
//! same invocation, and results from different hosts can be told apart.

use std::time::{Duration, Instant};

use aws_lc_rs::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use serde::Serialize;

/// The processor, as `/proc/cpuinfo` names it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Cpu {
    /// `model name`.
    pub model_name: String,
    /// `cpu family` (AMD: 23 is Zen 1 and 2, 25 is Zen 3 and 4, 26 is Zen 5).
    pub family: Option<u32>,
    /// `model`.
    pub model: Option<u32>,
    /// The flags that decide AES-GCM's speed, those present: `aes`, `pclmulqdq`, `avx2`,
    /// `vaes`, `vpclmulqdq`, `avx512f`.
    pub crypto_flags: Vec<String>,
}

/// The flags worth recording: the AES and carry-less multiply instructions and their wide
/// vector forms, which set how fast AES-GCM runs.
const CRYPTO_FLAGS: [&str; 6] = ["aes", "pclmulqdq", "avx2", "vaes", "vpclmulqdq", "avx512f"];

impl Cpu {
    /// Reads this machine's processor; fields it cannot read stay empty.
    pub fn this_machine() -> Self {
        std::fs::read_to_string("/proc/cpuinfo")
            .map(|s| Self::parse(&s))
            .unwrap_or_default()
    }

    /// Parses the first processor's entry of a `/proc/cpuinfo` text.
    pub fn parse(text: &str) -> Self {
        let mut cpu = Self::default();
        for line in text.lines() {
            if line.trim().is_empty() && !cpu.model_name.is_empty() {
                break;
            }
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "model name" => cpu.model_name = value.to_owned(),
                "cpu family" => cpu.family = value.parse().ok(),
                "model" => cpu.model = value.parse().ok(),
                "flags" => {
                    let present: Vec<&str> = value.split_whitespace().collect();
                    cpu.crypto_flags = CRYPTO_FLAGS
                        .iter()
                        .filter(|f| present.contains(f))
                        .map(|f| (*f).to_owned())
                        .collect();
                }
                _ => {}
            }
        }
        cpu
    }
}

/// One-core rates measured on this host, 10^9 bytes per second.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rates {
    /// AES-128-GCM (the suite TLS and QUIC negotiate first) sealing 16 KiB records, as
    /// TLS does, in place.
    pub aes_128_gcm_seal_gbps: f64,
    /// AES-128-GCM opening (verifying and decrypting) the same records in place.
    pub aes_128_gcm_open_gbps: f64,
    /// BLAKE3 hashing 8 MiB (one thread), as a receiver verifies chunks.
    pub blake3_gbps: f64,
    /// Copying 8 MiB between two buffers (larger than most caches, as transfers are).
    pub memcpy_gbps: f64,
}

impl Rates {
    /// The least CPU seconds per 10^9 bytes a verified secure transfer can cost on this
    /// host, given what the bare TCP loop costs (`bare_tcp_cpu_s_per_gb`, both ends): that
    /// loop's kernel copies, plus one seal at the sender, one open at the receiver and one
    /// BLAKE3 pass at the receiver.
    pub fn floor_cpu_s_per_gb(&self, bare_tcp_cpu_s_per_gb: f64) -> f64 {
        let per_gb = |gbps: f64| if gbps > 0.0 { 1.0 / gbps } else { 0.0 };
        bare_tcp_cpu_s_per_gb
            + per_gb(self.aes_128_gcm_seal_gbps)
            + per_gb(self.aes_128_gcm_open_gbps)
            + per_gb(self.blake3_gbps)
    }
}

/// Record size for the AEAD probe: TLS's largest record.
const RECORD: usize = 16 << 10;
/// Buffer size for the copy probe.
const COPY: usize = 8 << 20;

/// Measures both rates for about `budget` each on the calling thread, keeping the fastest
/// of several rounds (the least disturbed by other work on a shared machine).
pub fn measure(budget: Duration) -> anyhow::Result<Rates> {
    let mut seal = SealProbe::new()?;
    let mut open = OpenProbe::new()?;
    let mut copy = CopyProbe::new();
    let hash = vec![0x5a_u8; COPY];
    let memcpy_gbps = fastest(budget, COPY, || copy.round());
    // Each open round first restores its ciphertext (a copy of the same records): the
    // fastest round of those copies alone is taken out of the fastest round of both.
    anyhow::ensure!(
        open.round(),
        "the AES-GCM open probe failed to open its records"
    );
    let both = fastest(budget, OpenProbe::BYTES, || {
        open.round();
    });
    let restore = fastest(budget, OpenProbe::BYTES, || open.restore_all());
    let secs = |gbps: f64| OpenProbe::BYTES as f64 / (gbps * 1e9);
    let open_secs = (secs(both) - secs(restore)).max(secs(both) / 100.0);
    Ok(Rates {
        aes_128_gcm_seal_gbps: fastest(budget, SealProbe::BYTES, || seal.round()),
        aes_128_gcm_open_gbps: OpenProbe::BYTES as f64 / open_secs / 1e9,
        blake3_gbps: fastest(budget, COPY, || {
            std::hint::black_box(blake3::hash(std::hint::black_box(&hash)));
        }),
        memcpy_gbps,
    })
}

/// Runs `round` (which processes `bytes`) repeatedly for `budget` and returns the fastest
/// round's rate.
fn fastest(budget: Duration, bytes: usize, mut round: impl FnMut()) -> f64 {
    round(); // warm up: page faults, key schedule, caches
    let started = Instant::now();
    let mut best = Duration::MAX;
    while started.elapsed() < budget || best == Duration::MAX {
        let t = Instant::now();
        round();
        best = best.min(t.elapsed());
    }
    bytes as f64 / best.as_secs_f64().max(1e-9) / 1e9
}

/// The AEAD probe: each round seals one record in place 64 times, under fresh nonces.
struct SealProbe {
    key: LessSafeKey,
    record: Vec<u8>,
    seq: u64,
}

impl SealProbe {
    const RECORDS: usize = 64;
    const BYTES: usize = RECORD * Self::RECORDS;
    /// A TLS 1.3 application-data record header, as the additional data.
    const AAD: [u8; 5] = [0x17, 0x03, 0x03, 0x40, 0x11];

    fn new() -> anyhow::Result<Self> {
        let key = UnboundKey::new(&AES_128_GCM, &[0x42; 16])
            .map_err(|_| anyhow::anyhow!("AES-128-GCM is not available"))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            record: vec![0x5a; RECORD],
            seq: 0,
        })
    }

    fn nonce(seq: u64) -> Nonce {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&seq.to_be_bytes());
        Nonce::assume_unique_for_key(nonce)
    }

    fn round(&mut self) {
        for _ in 0..Self::RECORDS {
            self.seq += 1;
            let tag = self.key.seal_in_place_separate_tag(
                Self::nonce(self.seq),
                Aad::from(Self::AAD),
                &mut self.record,
            );
            std::hint::black_box(&tag);
        }
        std::hint::black_box(&self.record);
    }
}

/// The open probe: 64 records sealed once; each round restores their ciphertext and opens
/// each in place, checking its tag.
struct OpenProbe {
    key: LessSafeKey,
    sealed: Vec<Vec<u8>>,
    work: Vec<u8>,
}

impl OpenProbe {
    const BYTES: usize = RECORD * SealProbe::RECORDS;

    fn new() -> anyhow::Result<Self> {
        let mut seal = SealProbe::new()?;
        let mut sealed = Vec::new();
        for seq in 1..=SealProbe::RECORDS as u64 {
            let mut record = vec![0x5a; RECORD];
            let tag = seal
                .key
                .seal_in_place_separate_tag(
                    SealProbe::nonce(seq),
                    Aad::from(SealProbe::AAD),
                    &mut record,
                )
                .map_err(|_| anyhow::anyhow!("sealing failed"))?;
            record.extend_from_slice(tag.as_ref());
            sealed.push(record);
        }
        seal.seq = 0;
        let key = UnboundKey::new(&AES_128_GCM, &[0x42; 16])
            .map_err(|_| anyhow::anyhow!("AES-128-GCM is not available"))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            work: vec![0; RECORD + AES_128_GCM.tag_len()],
            sealed,
        })
    }

    /// Only the restoring copies of a round, to take their time out of it.
    fn restore_all(&mut self) {
        for record in &self.sealed {
            self.work.copy_from_slice(record);
            std::hint::black_box(&self.work);
        }
    }

    /// Opens every record; false if one failed to open (the probe measured nothing real).
    fn round(&mut self) -> bool {
        let mut ok = true;
        for (i, record) in self.sealed.iter().enumerate() {
            self.work.copy_from_slice(record);
            let opened = self.key.open_in_place(
                SealProbe::nonce(i as u64 + 1),
                Aad::from(SealProbe::AAD),
                &mut self.work,
            );
            ok &= opened.is_ok();
            std::hint::black_box(&opened);
        }
        ok
    }
}

/// The copy probe: each round copies one buffer into another.
struct CopyProbe {
    from: Vec<u8>,
    to: Vec<u8>,
}

impl CopyProbe {
    fn new() -> Self {
        Self {
            from: vec![0x5a; COPY],
            to: vec![0; COPY],
        }
    }

    fn round(&mut self) {
        self.to.copy_from_slice(std::hint::black_box(&self.from));
        std::hint::black_box(&self.to);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const ZEN1: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\n\
        model\t\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 pclmulqdq avx2 aes sha_ni\n\n\
        processor\t: 1\nmodel name\t: Something Else\nflags\t\t: vaes avx512f\n";

    #[test]
    fn cpuinfo_names_the_first_processor_and_its_crypto_flags() {
        let cpu = Cpu::parse(ZEN1);
        assert_eq!(cpu.model_name, "AMD EPYC");
        assert_eq!(cpu.family, Some(23));
        assert_eq!(cpu.model, Some(1));
        // Only the recorded flags, in a fixed order; the second processor's are not mixed in.
        assert_eq!(cpu.crypto_flags, ["aes", "pclmulqdq", "avx2"]);
    }

    #[test]
    fn cpuinfo_without_the_fields_leaves_them_empty() {
        assert_eq!(Cpu::parse("garbage\nno colon here\n"), Cpu::default());
        let cpu = Cpu::parse("cpu family\t: not-a-number\nflags\t: sse2\nmodel name: X\n");
        assert_eq!(cpu.family, None);
        assert!(cpu.crypto_flags.is_empty());
    }

    #[test]
    fn the_seal_probe_really_seals_every_record() {
        let mut probe = SealProbe::new().unwrap();
        probe.round();
        assert_eq!(probe.seq, SealProbe::RECORDS as u64);
        assert_ne!(probe.record, vec![0x5a_u8; RECORD]);
        // The same 64 seals done independently give the same bytes: every seal happened,
        // under the nonce it claims.
        let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[0x42; 16]).unwrap());
        let mut expected = vec![0x5a_u8; RECORD];
        for seq in 1..=SealProbe::RECORDS as u64 {
            let _tag = key
                .seal_in_place_separate_tag(
                    SealProbe::nonce(seq),
                    Aad::from(SealProbe::AAD),
                    &mut expected,
                )
                .unwrap();
        }
        assert_eq!(probe.record, expected);
    }

    #[test]
    fn the_copy_probe_copies_and_the_rates_are_real_numbers() {
        let mut copy = CopyProbe::new();
        copy.round();
        assert_eq!(copy.to, copy.from);

        let rates = measure(Duration::from_millis(20)).unwrap();
        for r in [
            rates.aes_128_gcm_seal_gbps,
            rates.aes_128_gcm_open_gbps,
            rates.blake3_gbps,
            rates.memcpy_gbps,
        ] {
            assert!(r.is_finite() && r > 0.0, "{rates:?}");
        }
    }

    #[test]
    fn the_open_probe_opens_genuine_records_and_refuses_a_damaged_one() {
        let mut open = OpenProbe::new().unwrap();
        assert!(open.round(), "the probe's own records must open");
        assert_eq!(&open.work[..RECORD], &[0x5a; RECORD][..]);
        open.sealed[3][10] ^= 1;
        assert!(!open.round(), "a damaged record must not open");
    }

    #[test]
    fn the_floor_adds_one_seal_one_open_and_one_hash_to_the_bare_loop() {
        let rates = Rates {
            aes_128_gcm_seal_gbps: 4.0,
            aes_128_gcm_open_gbps: 5.0,
            blake3_gbps: 2.0,
            memcpy_gbps: 20.0,
        };
        let floor = rates.floor_cpu_s_per_gb(0.3);
        assert!((floor - (0.3 + 0.25 + 0.2 + 0.5)).abs() < 1e-12, "{floor}");
    }
}
