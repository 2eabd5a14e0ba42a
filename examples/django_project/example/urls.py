from catalog import views
from django.urls import path

urlpatterns = [
    path("", views.index),
    path("items", views.items),
    path("items/create", views.create),
    path("items/fail", views.fail),
    path("items/slow", views.slow),
]
