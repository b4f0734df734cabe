//! IA32_PASID (MSR 0xD93) snippets for payloads: machine code a long-mode payload can
//! splice in to set or read its vCPU's IA32_PASID (the ENQCMD payload tests use them).

/// IA32_PASID.
pub const MSR_IA32_PASID: u32 = 0xd93;
/// IA32_PASID's valid bit.
pub const IA32_PASID_VALID: u64 = 1 << 31;

/// The IA32_PASID value that makes `pasid` the vCPU's valid PASID.
pub fn ia32_pasid_valid(pasid: u32) -> u64 {
    IA32_PASID_VALID | u64::from(pasid & 0xf_ffff)
}

/// `mov ecx, 0xd93; mov eax, value[31:0]; mov edx, value[63:32]; wrmsr` (17 bytes;
/// clobbers eax, ecx, edx).
pub fn wrmsr_ia32_pasid(value: u64) -> [u8; 17] {
    let mut c = [0u8; 17];
    c[0] = 0xb9; // mov ecx, imm32
    c[1..5].copy_from_slice(&MSR_IA32_PASID.to_le_bytes());
    c[5] = 0xb8; // mov eax, imm32
    c[6..10].copy_from_slice(&(value as u32).to_le_bytes());
    c[10] = 0xba; // mov edx, imm32
    c[11..15].copy_from_slice(&((value >> 32) as u32).to_le_bytes());
    c[15..17].copy_from_slice(&[0x0f, 0x30]); // wrmsr
    c
}

/// `mov ecx, 0xd93; rdmsr; mov [gpa], eax; mov [gpa + 4], edx` (21 bytes; `gpa` below
/// 2 GiB, absolute; clobbers eax, ecx, edx).
pub fn rdmsr_ia32_pasid_to(gpa: u32) -> [u8; 21] {
    let mut c = [0u8; 21];
    c[0] = 0xb9;
    c[1..5].copy_from_slice(&MSR_IA32_PASID.to_le_bytes());
    c[5..7].copy_from_slice(&[0x0f, 0x32]); // rdmsr
    c[7..10].copy_from_slice(&[0x89, 0x04, 0x25]); // mov [disp32], eax
    c[10..14].copy_from_slice(&gpa.to_le_bytes());
    c[14..17].copy_from_slice(&[0x89, 0x14, 0x25]); // mov [disp32], edx
    c[17..21].copy_from_slice(&(gpa + 4).to_le_bytes());
    c
}
