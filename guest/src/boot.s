/* PVH entry: QEMU enters _start32 in 32-bit protected mode, paging off, %ebx = the physical
 * address of struct hvm_start_info. We note the TSC (the start of boot), build identity page
 * tables for the low 4 GiB with 2 MiB pages, enable PAE + long mode + paging, load a minimal
 * 64-bit GDT and call kmain(start_info). Rust then installs its own GDT, TSS, IDT and page
 * tables. */

    .section .note.Xen, "a", @note
    .balign 4
    .long 4                     /* namesz: "Xen\0" */
    .long 8                     /* descsz */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad _start32              /* ELFCLASS64: QEMU reads 8 bytes */
    .balign 4

    .section .text.boot, "ax"
    .code32
    .global _start32
_start32:
    cli
    cld
    mov %ebx, %esi              /* keep start_info */
    rdtsc
    mov %eax, boot_tsc
    mov %edx, boot_tsc + 4

    mov $boot_pml4, %edi        /* zero PML4, PDPT and the four PDs */
    xor %eax, %eax
    mov $(6 * 4096 / 4), %ecx
    rep stosl

    mov $boot_pdpt, %eax
    or $3, %eax
    mov %eax, boot_pml4

    mov $boot_pd, %eax          /* four PDPT entries, one per GiB */
    or $3, %eax
    mov $boot_pdpt, %edi
    mov $4, %ecx
1:  mov %eax, (%edi)
    add $4096, %eax
    add $8, %edi
    dec %ecx
    jnz 1b

    mov $boot_pd, %edi          /* 2048 PD entries: 2 MiB pages, present, writable */
    mov $0x83, %eax
    xor %edx, %edx
    mov $2048, %ecx
2:  mov %eax, (%edi)
    mov %edx, 4(%edi)
    add $0x200000, %eax
    adc $0, %edx
    add $8, %edi
    dec %ecx
    jnz 2b

    mov %cr4, %eax              /* PAE */
    or $0x20, %eax
    mov %eax, %cr4
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx       /* EFER.LME, and NXE for the text alias's NX pages */
    rdmsr
    or $0x900, %eax
    wrmsr
    mov %cr0, %eax              /* PG | PE */
    or $0x80000001, %eax
    mov %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp $0x08, $start64

    .code64
start64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    lea boot_stack_top(%rip), %rsp
    mov %esi, %edi              /* kmain(start_info physical address) */
    call kmain
3:  hlt
    jmp 3b

/* 256 interrupt stubs, 16 bytes apart. Vectors for which the CPU pushes no error code push a
 * zero, so that every frame has the same shape; then the vector. */
    .balign 16
    .global isr_stubs
isr_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
    .endr

/* Saves the general-purpose registers below the vector, so that the stack holds, from low
 * addresses: rax rcx rdx rbx (rsp) rbp rsi rdi r8..r15, vector, error, rip, cs, rflags, rsp,
 * ss -- struct IsrContext; calls `handler` with it; restores them (the saved rsp, which the
 * handler may change, is copied back into the frame) and drops the vector and error code,
 * which leaves the return frame. Shared with the Xen PV entry (xen.s). */
    .macro CONTEXT_CALL handler
    push %r15
    push %r14
    push %r13
    push %r12
    push %r11
    push %r10
    push %r9
    push %r8
    push %rdi
    push %rsi
    push %rbp
    push 0x80(%rsp)             /* the interrupted rsp, from the frame (11 pushes + vector, error, rip, cs, rflags above) */
    push %rbx
    push %rdx
    push %rcx
    push %rax
    mov %rsp, %rdi
    sub $8, %rsp                /* 23 quadwords were pushed: realign to 16 for the call */
    cld
    call \handler
    add $8, %rsp
    mov 0x20(%rsp), %rax        /* the (possibly changed) rsp goes back into the frame */
    mov %rax, 0xa8(%rsp)
    pop %rax
    pop %rcx
    pop %rdx
    pop %rbx
    add $8, %rsp
    pop %rbp
    pop %rsi
    pop %rdi
    pop %r8
    pop %r9
    pop %r10
    pop %r11
    pop %r12
    pop %r13
    pop %r14
    pop %r15
    add $16, %rsp               /* vector, error */
    .endm

/* The interrupt stubs' common part: iretq resumes with the (possibly changed) registers. */
isr_common:
    CONTEXT_CALL isr_dispatch
    iretq

    .section .rodata.boot, "a"
    .balign 8
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: data */
boot_gdt_ptr:
    .word boot_gdt_ptr - boot_gdt - 1
    .long boot_gdt

    .section .bss.boot, "aw", @nobits
    .balign 8
    .global boot_tsc
boot_tsc: .skip 8
    .balign 4096
    .global boot_pml4
boot_pml4: .skip 4096
boot_pdpt: .skip 4096
boot_pd:   .skip 4 * 4096
    .balign 16
boot_stack: .skip 64 * 1024
boot_stack_top:
