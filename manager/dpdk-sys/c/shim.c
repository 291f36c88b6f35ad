/* nfmgr's C shim over DPDK; see shim.h. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <rte_config.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_log.h>
#include <rte_mbuf.h>
#include <rte_mbuf_pool_ops.h>
#include <rte_mempool.h>
#include <rte_spinlock.h>

#include "shim.h"

int nf_rte_errno(void) { return rte_errno; }

uint16_t nf_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n)
{
	return rte_eth_rx_burst(port, queue, pkts, n);
}

uint16_t nf_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n)
{
	return rte_eth_tx_burst(port, queue, pkts, n);
}

void nf_pktmbuf_free(struct rte_mbuf *m) { rte_pktmbuf_free(m); }

void *nf_mbuf_buf_addr(const struct rte_mbuf *m) { return m->buf_addr; }
uint16_t nf_mbuf_data_off(const struct rte_mbuf *m) { return m->data_off; }
uint16_t nf_mbuf_data_len(const struct rte_mbuf *m) { return m->data_len; }
uint16_t nf_mbuf_nb_segs(const struct rte_mbuf *m) { return m->nb_segs; }

void nf_mbuf_prepare_tx(struct rte_mbuf *m, uint16_t off, uint16_t len)
{
	m->data_off = off;
	m->data_len = len;
	m->pkt_len = len;
	m->nb_segs = 1;
	m->next = NULL;
	/* The data buffer is external (pinned to a region buffer), and nothing else. */
	m->ol_flags = RTE_MBUF_F_EXTERNAL;
	m->packet_type = 0;
	rte_mbuf_refcnt_set(m, 1);
}

/* ---- the region mempool driver ---- */

#define NF_REGION_OPS "nf_region"

struct nf_region_state {
	struct nf_pool_hooks hooks;
	/* Set by region_alloc: the pool owns this state (and frees it). */
	int attached;
	char *base;
	uint16_t buf_size;
	uint32_t count;
	/* The mbuf pinned to each buffer. */
	struct rte_mbuf **mbufs;
	/* Set once every mbuf is pinned; before that, puts are the pool being populated. */
	int ready;
	/*
	 * Buffers DPDK returned on a thread with no context (another thread of EAL's, or a
	 * device stopped outside a burst); given back at the next burst. Locked: any thread
	 * may add to it.
	 */
	rte_spinlock_t orphans_lock;
	uint32_t *orphans;
	uint32_t n_orphans;
	/* Only used by the thread that holds the context. */
	uint32_t *scratch;
};

/*
 * The hooks' context is per thread: only the thread that set it (nfmgr's data-plane thread,
 * around its DPDK calls) reaches the platform's pool; any other thread's frees wait in the
 * orphan list and its allocations fail.
 */
static __thread void *nf_ctx;

/* The state of the pool being created (the driver's alloc runs inside the create call). */
static struct nf_region_state *nf_creating;

static int region_alloc(struct rte_mempool *mp)
{
	if (nf_creating == NULL)
		return -EINVAL;
	mp->pool_data = nf_creating;
	nf_creating->attached = 1;
	return 0;
}

static void region_free(struct rte_mempool *mp)
{
	struct nf_region_state *s = mp->pool_data;
	if (s == NULL)
		return;
	free(s->mbufs);
	free(s->orphans);
	free(s->scratch);
	free(s);
	mp->pool_data = NULL;
}

static inline uint32_t index_of(const struct nf_region_state *s, const struct rte_mbuf *m)
{
	const char *a = m->buf_addr;
	if (a < s->base || a >= s->base + (size_t)s->count * s->buf_size)
		return UINT32_MAX;
	return (uint32_t)((size_t)(a - s->base) / s->buf_size);
}

static int region_enqueue(struct rte_mempool *mp, void *const *objs, unsigned int n)
{
	struct nf_region_state *s = mp->pool_data;
	if (!s->ready)
		return 0; /* populating: the platform's pool already holds every buffer */
	if (nf_ctx == NULL) {
		rte_spinlock_lock(&s->orphans_lock);
		for (unsigned int i = 0; i < n; i++) {
			uint32_t idx = index_of(s, objs[i]);
			if (idx != UINT32_MAX && s->n_orphans < s->count)
				s->orphans[s->n_orphans++] = idx;
		}
		rte_spinlock_unlock(&s->orphans_lock);
		return 0;
	}
	uint32_t k = 0;
	for (unsigned int i = 0; i < n; i++) {
		uint32_t idx = index_of(s, objs[i]);
		if (idx != UINT32_MAX)
			s->scratch[k++] = idx;
	}
	if (k > 0)
		s->hooks.free(nf_ctx, s->scratch, k);
	return 0;
}

static int region_dequeue(struct rte_mempool *mp, void **objs, unsigned int n)
{
	struct nf_region_state *s = mp->pool_data;
	if (!s->ready || nf_ctx == NULL || n > s->count)
		return -ENOBUFS;
	uint32_t got = s->hooks.alloc(nf_ctx, s->scratch, n);
	if (got < n) {
		/* All or nothing. */
		if (got > 0)
			s->hooks.free(nf_ctx, s->scratch, got);
		return -ENOBUFS;
	}
	for (unsigned int i = 0; i < n; i++)
		objs[i] = s->mbufs[s->scratch[i]];
	return 0;
}

static unsigned region_get_count(const struct rte_mempool *mp)
{
	const struct nf_region_state *s = mp->pool_data;
	if (s == NULL || nf_ctx == NULL)
		return 0;
	return s->hooks.count(nf_ctx);
}

static const struct rte_mempool_ops nf_region_ops = {
	.name = NF_REGION_OPS,
	.alloc = region_alloc,
	.free = region_free,
	.enqueue = region_enqueue,
	.dequeue = region_dequeue,
	.get_count = region_get_count,
};

int nf_region_ops_register(void)
{
	static int id = -1;
	if (id < 0)
		id = rte_mempool_register_ops(&nf_region_ops);
	return id;
}

static void pin(struct rte_mempool *mp, void *arg, void *obj, unsigned int obj_idx)
{
	(void)mp;
	(void)obj_idx;
	struct nf_region_state *s = arg;
	struct rte_mbuf *m = obj;
	uint32_t idx = index_of(s, m);
	if (idx != UINT32_MAX)
		s->mbufs[idx] = m;
}

struct rte_mempool *nf_region_pool_create(const char *name, void *base, uint64_t iova,
					  uint32_t count, uint16_t buf_size,
					  const struct nf_pool_hooks *hooks)
{
	if (nf_region_ops_register() < 0)
		return NULL;
	struct nf_region_state *s = calloc(1, sizeof(*s));
	if (s == NULL) {
		rte_errno = ENOMEM;
		return NULL;
	}
	s->hooks = *hooks;
	s->base = base;
	s->buf_size = buf_size;
	s->count = count;
	s->mbufs = calloc(count, sizeof(*s->mbufs));
	s->orphans = calloc(count, sizeof(*s->orphans));
	s->scratch = calloc(count, sizeof(*s->scratch));
	rte_spinlock_init(&s->orphans_lock);
	if (s->mbufs == NULL || s->orphans == NULL || s->scratch == NULL) {
		free(s->mbufs);
		free(s->orphans);
		free(s->scratch);
		free(s);
		rte_errno = ENOMEM;
		return NULL;
	}
	struct rte_pktmbuf_extmem ext = {
		.buf_ptr = base,
		.buf_iova = iova,
		.buf_len = (size_t)count * buf_size,
		.elt_size = buf_size,
	};
	/* The pool takes the best ops, which this makes ours for the call. */
	/*
	 * The pool takes the "best" mempool ops, which the user setting decides: it is ours for
	 * this one call, then what it was (DPDK's default when there was none), so that pools
	 * created later (by drivers) get an ordinary driver.
	 */
	char before[RTE_MEMPOOL_OPS_NAMESIZE];
	const char *user = rte_mbuf_user_mempool_ops();
	snprintf(before, sizeof(before), "%s", user != NULL ? user : RTE_MBUF_DEFAULT_MEMPOOL_OPS);
	if (rte_mbuf_set_user_mempool_ops(NF_REGION_OPS) != 0) {
		free(s->mbufs);
		free(s->orphans);
		free(s->scratch);
		free(s);
		return NULL;
	}
	nf_creating = s;
	struct rte_mempool *mp = rte_pktmbuf_pool_create_extbuf(
		name, count, 0, 0, buf_size, SOCKET_ID_ANY, &ext, 1);
	nf_creating = NULL;
	rte_mbuf_set_user_mempool_ops(before);
	if (mp == NULL) {
		/* Once attached, the pool's free (region_free) released the state. */
		if (!s->attached) {
			free(s->mbufs);
			free(s->orphans);
			free(s->scratch);
			free(s);
		}
		return NULL;
	}
	if (mp->pool_data != s) {
		/* Built with another driver: its buffers would not be the platform's. */
		rte_mempool_free(mp);
		if (!s->attached) {
			free(s->mbufs);
			free(s->orphans);
			free(s->scratch);
			free(s);
		}
		rte_errno = EINVAL;
		return NULL;
	}
	rte_mempool_obj_iter(mp, pin, s);
	for (uint32_t i = 0; i < count; i++) {
		if (s->mbufs[i] == NULL) {
			rte_mempool_free(mp);
			rte_errno = EFAULT;
			return NULL;
		}
	}
	s->ready = 1;
	return mp;
}

void nf_region_pool_set_ctx(struct rte_mempool *mp, void *ctx)
{
	struct nf_region_state *s = mp->pool_data;
	nf_ctx = ctx;
	if (ctx != NULL && s->n_orphans > 0) {
		rte_spinlock_lock(&s->orphans_lock);
		s->hooks.free(ctx, s->orphans, s->n_orphans);
		s->n_orphans = 0;
		rte_spinlock_unlock(&s->orphans_lock);
	}
}

struct rte_mbuf *nf_region_pool_mbuf(struct rte_mempool *mp, uint32_t idx)
{
	const struct nf_region_state *s = mp->pool_data;
	return idx < s->count ? s->mbufs[idx] : NULL;
}

uint32_t nf_region_pool_index(struct rte_mempool *mp, const struct rte_mbuf *m)
{
	return index_of(mp->pool_data, m);
}

/* ---- bursts over the region pool ---- */

#define NF_BURST_MAX 64

uint16_t nf_rx_region(uint16_t port, uint16_t queue, struct rte_mempool *mp, uint32_t *buf,
		      uint16_t *off, uint16_t *len, uint16_t n, uint32_t *refused)
{
	struct rte_mbuf *m[NF_BURST_MAX];
	const struct nf_region_state *s = mp->pool_data;
	if (n > NF_BURST_MAX)
		n = NF_BURST_MAX;
	uint16_t got = rte_eth_rx_burst(port, queue, m, n);
	uint16_t k = 0;
	for (uint16_t i = 0; i < got; i++) {
		if (i + 1 < got)
			rte_prefetch0(m[i + 1]);
		uint32_t idx = index_of(s, m[i]);
		if (idx == UINT32_MAX || s->mbufs[idx] != m[i] || m[i]->nb_segs != 1) {
			rte_pktmbuf_free(m[i]);
			(*refused)++;
			continue;
		}
		buf[k] = idx;
		off[k] = m[i]->data_off;
		len[k] = m[i]->data_len;
		k++;
	}
	return k;
}

uint16_t nf_tx_region(uint16_t port, uint16_t queue, struct rte_mempool *mp,
		      const uint32_t *buf, const uint16_t *off, const uint16_t *len, uint16_t n)
{
	struct rte_mbuf *m[NF_BURST_MAX];
	const struct nf_region_state *s = mp->pool_data;
	if (n > NF_BURST_MAX)
		n = NF_BURST_MAX;
	/* The headers are cold (one 128-byte line per buffer): start loading them all. */
	for (uint16_t i = 0; i < n; i++)
		if (buf[i] < s->count)
			rte_prefetch0(s->mbufs[buf[i]]);
	uint16_t k = 0;
	for (uint16_t i = 0; i < n; i++) {
		if (buf[i] >= s->count)
			continue;
		m[k] = s->mbufs[buf[i]];
		nf_mbuf_prepare_tx(m[k], off[i], len[i]);
		k++;
	}
	uint16_t sent = rte_eth_tx_burst(port, queue, m, k);
	for (uint16_t i = sent; i < k; i++)
		rte_pktmbuf_free(m[i]);
	return sent;
}

/* ---- EAL's log, captured for errors ---- */

static FILE *nf_log;
static char *nf_log_buf;
static size_t nf_log_len;

int nf_log_capture_start(void)
{
	nf_log = open_memstream(&nf_log_buf, &nf_log_len);
	if (nf_log == NULL)
		return -1;
	return rte_openlog_stream(nf_log);
}

size_t nf_log_capture_take(char *buf, size_t len)
{
	if (nf_log == NULL || len == 0)
		return 0;
	/* Back to stderr first, so that no EAL thread writes while the text is copied. */
	rte_openlog_stream(NULL);
	fclose(nf_log);
	nf_log = NULL;
	size_t n = nf_log_len < len - 1 ? nf_log_len : len - 1;
	/* The end of the log says why. */
	memcpy(buf, nf_log_buf + (nf_log_len - n), n);
	buf[n] = '\0';
	free(nf_log_buf);
	nf_log_buf = NULL;
	return n;
}
