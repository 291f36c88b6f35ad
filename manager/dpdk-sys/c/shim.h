/*
 * nfmgr's C shim over DPDK: the static inline functions of the hot path, which bindgen
 * cannot bind, and the "region" mempool driver that makes DPDK allocate its packet buffers
 * from the platform's own pool.
 */
#ifndef NF_DPDK_SHIM_H
#define NF_DPDK_SHIM_H

#include <stdint.h>
#include <stdio.h>

struct rte_mbuf;
struct rte_mempool;

/* rte_errno is a per-lcore macro. */
int nf_rte_errno(void);

/* The hot path. */
uint16_t nf_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
uint16_t nf_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
void nf_pktmbuf_free(struct rte_mbuf *m);

/* What nfmgr reads and writes in an mbuf whose data buffer is a region buffer. */
void *nf_mbuf_buf_addr(const struct rte_mbuf *m);
uint16_t nf_mbuf_data_off(const struct rte_mbuf *m);
uint16_t nf_mbuf_data_len(const struct rte_mbuf *m);
uint16_t nf_mbuf_nb_segs(const struct rte_mbuf *m);
/* Makes `m` a single-segment packet of `len` bytes at `off` in its buffer, to transmit. */
void nf_mbuf_prepare_tx(struct rte_mbuf *m, uint16_t off, uint16_t len);

/*
 * The region mempool driver ("nf_region"). Buffers are the platform's: DPDK's mbuf i is
 * pinned to region buffer i, and getting or putting mbufs takes or returns buffer indices
 * through these hooks, so one free list serves DPDK and the processes.
 */
struct nf_pool_hooks {
	/* Takes up to n free buffers; writes their indices; returns how many it took. */
	uint32_t (*alloc)(void *ctx, uint32_t *idx, uint32_t n);
	/* Returns n buffers to the pool. */
	void (*free)(void *ctx, const uint32_t *idx, uint32_t n);
	/* Free buffers in the pool. */
	uint32_t (*count)(void *ctx);
};

/* Registers the driver (once, before the pool is created). */
int nf_region_ops_register(void);

/*
 * Creates the pktmbuf pool over the region's buffers: `count` buffers of `buf_size` bytes
 * from `base` (I/O address `iova`, or RTE_BAD_IOVA). Returns NULL with rte_errno set.
 */
struct rte_mempool *nf_region_pool_create(const char *name, void *base, uint64_t iova,
					  uint32_t count, uint16_t buf_size,
					  const struct nf_pool_hooks *hooks);

/* The hooks' context for the calls that follow (NULL: none; frees are kept for later). */
void nf_region_pool_set_ctx(struct rte_mempool *mp, void *ctx);

/* The mbuf pinned to buffer `idx`, and the buffer of an mbuf (UINT32_MAX: not ours). */
struct rte_mbuf *nf_region_pool_mbuf(struct rte_mempool *mp, uint32_t idx);
uint32_t nf_region_pool_index(struct rte_mempool *mp, const struct rte_mbuf *m);

/*
 * Bursts over the region pool, one call per burst: the per-packet work (finding the pinned
 * mbuf, its fields) stays in C, with the mbuf headers prefetched.
 *
 * nf_rx_region receives up to n frames on (port, queue) and writes each one's buffer index,
 * data offset and length; frames it cannot hand on (several segments, or not in a region
 * buffer) are freed and counted in *refused. Returns the frames written.
 */
uint16_t nf_rx_region(uint16_t port, uint16_t queue, struct rte_mempool *mp, uint32_t *buf,
		      uint16_t *off, uint16_t *len, uint16_t n, uint32_t *refused);
/*
 * nf_tx_region sends n packets given by buffer index, offset and length; returns how many
 * the device took. The others are freed back to the pool (their count is n - returned).
 */
uint16_t nf_tx_region(uint16_t port, uint16_t queue, struct rte_mempool *mp,
		      const uint32_t *buf, const uint16_t *off, const uint16_t *len, uint16_t n);

/* Captures EAL's log in memory (for clear errors), or sends it back to stderr. */
int nf_log_capture_start(void);
/* Copies what was captured since start into buf (NUL-terminated); returns its length. */
size_t nf_log_capture_take(char *buf, size_t len);

#endif
