/* What bindgen sees: the DPDK APIs nfmgr uses, and the shim's own functions. */
#include <rte_config.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_lcore.h>
#include <rte_log.h>
#include <rte_mbuf.h>
#include <rte_mbuf_pool_ops.h>
#include <rte_mempool.h>
#include <rte_memory.h>
#include <rte_version.h>
#include "shim.h"
