from django.urls import include, path
from inventory.views import ProductViewSet, StockMovementViewSet, ping
from rest_framework.routers import DefaultRouter

router = DefaultRouter()
router.register("products", ProductViewSet)
router.register("movements", StockMovementViewSet)

urlpatterns = [
    path("api/ping/", ping),
    path("api/", include(router.urls)),
]
