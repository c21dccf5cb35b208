/* The boot shim's way in and out.
 *
 * In: the PVH loader enters shim_entry32 in 32-bit protected mode, paging off, %ebx = the
 * physical address of struct hvm_start_info. The shim's segment may be anywhere 2 MiB-aligned
 * (a loader honouring XEN_ELFNOTE_PHYS32_RELOC moves it with the kernel): every address here
 * is computed from where the code finds itself. The entry state (CR0, CR4, EFER, EFLAGS, GDTR,
 * the segment selectors, %esp, %ebx) is saved; page tables map the low 4 GiB identically and
 * SHIM_VBASE (where the shim is linked) to the segment; long mode; shim_main() runs the
 * runtime and returns the kernel's entry.
 *
 * Out: through a 32-bit code segment in compatibility mode, paging off, long mode off, and
 * everything saved put back as it was; then a far jump to the kernel's own PVH entry with the
 * loader's %cs. The same way out serves a bail-out before long mode (a segment not 2 MiB
 * aligned, a CPU without long mode): the kernel then boots as if the shim were not there. */

    .set SHIM_VBASE, 0xffffffffc0000000
    .set WINDOW, 4                      /* 2 MiB pages mapping the shim: 8 MiB */
    .if WINDOW - 4
    .error "the entry's stores map exactly four 2 MiB pages"
    .endif

    .section .text.entry32, "ax"
    .code32
    .global shim_entry32
shim_entry32:
    cli
    cld
    /* Where am I? The PVH ABI gives no stack: `call` pushes its return address into the upper
     * half of start_info's rsdp_paddr (bytes 36..39, there in every version), which is put
     * back at once. */
    mov %esp, %ecx
    mov 36(%ebx), %edx
    lea 40(%ebx), %esp
    call 1f
1:  pop %ebp
    mov %edx, 36(%ebx)
    sub $(1b - shim_entry32), %ebp      /* %ebp: the segment's physical address */
    lea (shim_stack_top - SHIM_VBASE)(%ebp), %esp
    mov %ebx, (shim_saved_ebx - SHIM_VBASE)(%ebp)
    mov %ecx, (shim_saved_esp - SHIM_VBASE)(%ebp)
    mov %cr0, %eax
    mov %eax, (shim_saved_cr0 - SHIM_VBASE)(%ebp)
    mov %cr4, %eax
    mov %eax, (shim_saved_cr4 - SHIM_VBASE)(%ebp)
    pushfl
    popl (shim_saved_eflags - SHIM_VBASE)(%ebp)
    sgdtl (shim_saved_gdtr - SHIM_VBASE)(%ebp)
    mov %cs, (shim_saved_sel - SHIM_VBASE)(%ebp)
    mov %ds, (shim_saved_sel - SHIM_VBASE + 2)(%ebp)
    mov %es, (shim_saved_sel - SHIM_VBASE + 4)(%ebp)
    mov %ss, (shim_saved_sel - SHIM_VBASE + 6)(%ebp)
    mov %fs, (shim_saved_sel - SHIM_VBASE + 8)(%ebp)
    mov %gs, (shim_saved_sel - SHIM_VBASE + 10)(%ebp)
    mov %ebp, (shim_phys_base - SHIM_VBASE)(%ebp)
    movl $0, (shim_phys_base - SHIM_VBASE + 4)(%ebp)
    rdtsc
    mov %eax, (shim_tsc_entry - SHIM_VBASE)(%ebp)
    mov %edx, (shim_tsc_entry - SHIM_VBASE + 4)(%ebp)

    /* The kernel's entry as loaded: as linked, plus how far the loader moved the shim. */
    mov (PVPATCH_SHIM_PARAMS - SHIM_VBASE + 8)(%ebp), %eax      /* linux_entry */
    add %ebp, %eax
    sub (PVPATCH_SHIM_PARAMS - SHIM_VBASE + 16)(%ebp), %eax     /* - shim_phys */
    mov %eax, (shim_linux_entry - SHIM_VBASE)(%ebp)

    /* Bail out (hand over untouched) if the segment is not 2 MiB-aligned or there is no long
     * mode. */
    test $0x1fffff, %ebp
    jnz 9f
    mov $0x80000000, %eax
    cpuid
    cmp $0x80000001, %eax
    jb 9f
    mov $0x80000001, %eax
    cpuid
    bt $29, %edx
    jnc 9f

    /* Page tables: PML4[0] -> the low PDPT, which maps the low 4 GiB identically (by four
     * 1 GiB pages where the CPU has them, else through four PDs of 2 MiB pages); PML4[511] ->
     * the high PDPT, whose entry 511 -> a PD mapping SHIM_VBASE to the segment. Only the four
     * tables every machine uses are zeroed (the low PDs are written whole when used). Stores
     * are unrolled and the loops few: under an emulator every iteration and every block
     * costs. */
    lea (shim_pml4 - SHIM_VBASE)(%ebp), %edi
    mov %edx, %esi                      /* CPUID 0x80000001 EDX: bit 26, 1 GiB pages */
    xor %eax, %eax
    mov $(4 * 4096 / 4), %ecx
    rep stosl

    lea (shim_pml4 - SHIM_VBASE)(%ebp), %edi
    lea (shim_pdpt_lo - SHIM_VBASE + 3)(%ebp), %eax
    mov %eax, (%edi)
    lea (shim_pdpt_hi - SHIM_VBASE + 3)(%ebp), %eax
    mov %eax, 511 * 8(%edi)

    lea (shim_pdpt_lo - SHIM_VBASE)(%ebp), %edi
    bt $26, %esi
    jnc 3f
    movl $0x00000083, (%edi)            /* present, writable, 1 GiB page */
    movl $0x40000083, 8(%edi)
    movl $0x80000083, 16(%edi)
    movl $0xc0000083, 24(%edi)
    jmp 4f
3:  lea (shim_pd_lo - SHIM_VBASE + 3)(%ebp), %eax
    mov %eax, (%edi)
    add $4096, %eax
    mov %eax, 8(%edi)
    add $4096, %eax
    mov %eax, 16(%edi)
    add $4096, %eax
    mov %eax, 24(%edi)
    lea (shim_pd_lo - SHIM_VBASE)(%ebp), %edi
    mov $0x83, %eax
    xor %edx, %edx
    mov $2048, %ecx
2:  mov %eax, (%edi)
    mov %edx, 4(%edi)
    add $0x200000, %eax
    add $8, %edi
    dec %ecx
    jnz 2b

4:  lea (shim_pdpt_hi - SHIM_VBASE)(%ebp), %edi
    lea (shim_pd_hi - SHIM_VBASE + 3)(%ebp), %eax
    mov %eax, 511 * 8(%edi)
    lea (shim_pd_hi - SHIM_VBASE)(%ebp), %edi
    lea 0x83(%ebp), %eax                /* WINDOW (4) 2 MiB pages onto the segment */
    mov %eax, (%edi)
    add $0x200000, %eax
    mov %eax, 8(%edi)
    add $0x200000, %eax
    mov %eax, 16(%edi)
    add $0x200000, %eax
    mov %eax, 24(%edi)

    /* The GDT's base as loaded. */
    lea (shim_gdt - SHIM_VBASE)(%ebp), %eax
    mov %eax, (shim_gdt_ptr - SHIM_VBASE + 2)(%ebp)
    lgdtl (shim_gdt_ptr - SHIM_VBASE)(%ebp)

    mov %cr4, %eax                      /* PAE */
    or $0x20, %eax
    mov %eax, %cr4
    lea (shim_pml4 - SHIM_VBASE)(%ebp), %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx               /* EFER: keep what it was, add LME */
    rdmsr
    mov %eax, (shim_saved_efer - SHIM_VBASE)(%ebp)
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax                      /* PG */
    or $0x80000000, %eax
    mov %eax, %cr0
    lea (entry64_low - SHIM_VBASE)(%ebp), %eax
    push $0x08
    push %eax
    lret

    .code64
entry64_low:                            /* identity-mapped: on to the linked address */
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    movabs $shim_stack_top, %rsp
    movabs $entry64_high, %rax
    jmp *%rax
entry64_high:
    call shim_main                      /* -> %rax: the kernel's entry (physical) */
    mov %rax, %rdi
    .global shim_leave
shim_leave:                             /* shim_leave(entry): also the panic handler's way */
    mov %edi, shim_linux_entry(%rip)
    mov shim_phys_base(%rip), %rdx
    movabs $SHIM_VBASE, %rcx
    movabs $shim_stack_top, %rsp        /* the stack and the code, by their identity alias */
    sub %rcx, %rsp
    add %rdx, %rsp
    lea handover32(%rip), %rax
    sub %rcx, %rax
    add %rdx, %rax
    push $0x18
    push %rax
    lretq

    .code32
handover32:
9:  call 5f
5:  pop %ebp
    sub $(5b - shim_entry32), %ebp
    mov %cr0, %eax                      /* paging on (from long mode): off, then long mode off */
    test $0x80000000, %eax
    jz 6f
    and $0x7fffffff, %eax
    mov %eax, %cr0
    mov $0xC0000080, %ecx
    mov (shim_saved_efer - SHIM_VBASE)(%ebp), %eax
    xor %edx, %edx
    wrmsr
6:  mov (shim_saved_cr4 - SHIM_VBASE)(%ebp), %eax
    mov %eax, %cr4
    mov (shim_saved_cr0 - SHIM_VBASE)(%ebp), %eax
    mov %eax, %cr0
    lgdtl (shim_saved_gdtr - SHIM_VBASE)(%ebp)
    mov (shim_saved_sel - SHIM_VBASE + 2)(%ebp), %ds
    mov (shim_saved_sel - SHIM_VBASE + 4)(%ebp), %es
    mov (shim_saved_sel - SHIM_VBASE + 6)(%ebp), %ss
    mov (shim_saved_sel - SHIM_VBASE + 8)(%ebp), %fs
    mov (shim_saved_sel - SHIM_VBASE + 10)(%ebp), %gs
    mov (shim_saved_esp - SHIM_VBASE)(%ebp), %esp
    /* The far pointer: the kernel's entry, the loader's code selector. */
    mov (shim_linux_entry - SHIM_VBASE)(%ebp), %eax
    mov %eax, (shim_far - SHIM_VBASE)(%ebp)
    movzwl (shim_saved_sel - SHIM_VBASE)(%ebp), %eax
    mov %eax, (shim_far - SHIM_VBASE + 4)(%ebp)
    pushl (shim_saved_eflags - SHIM_VBASE)(%ebp)
    popfl
    mov (shim_saved_ebx - SHIM_VBASE)(%ebp), %ebx
    ljmpl *(shim_far - SHIM_VBASE)(%ebp)

    .section .data, "aw"
    .balign 16
shim_gdt:
    .quad 0
    .quad 0x00af9a000000ffff            /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff            /* 0x10: data */
    .quad 0x00cf9a000000ffff            /* 0x18: 32-bit code */
shim_gdt_end:
    .balign 8
shim_gdt_ptr:
    .word shim_gdt_end - shim_gdt - 1
    .long 0                             /* the physical base, set at entry */
    .balign 8
    .global shim_phys_base
shim_phys_base:   .quad 0
    .global shim_tsc_entry
shim_tsc_entry:   .quad 0
    .global shim_saved_ebx
shim_saved_ebx:   .long 0
shim_saved_esp:   .long 0
shim_saved_cr0:   .long 0
shim_saved_cr4:   .long 0
shim_saved_efer:  .long 0
shim_saved_eflags: .long 0
    .global shim_linux_entry
shim_linux_entry: .long 0
shim_far:         .long 0, 0
shim_saved_gdtr:  .word 0
                  .long 0
                  .balign 4
shim_saved_sel:   .word 0, 0, 0, 0, 0, 0

    .section .bss.tables, "aw", @nobits
    .balign 4096
shim_pml4:    .skip 4096              /* the four tables zeroed at the entry, together */
shim_pdpt_lo: .skip 4096
shim_pdpt_hi: .skip 4096
shim_pd_hi:   .skip 4096
shim_pd_lo:   .skip 4 * 4096          /* only without 1 GiB pages */
    .balign 16
shim_stack:   .skip 64 * 1024
shim_stack_top:
